"""The A/B report's statistics against known values and on seeded simulations with a known effect."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from scipy import stats

from middleware.cli import main
from middleware.evaluation import ab
from middleware.events.model import Event, QueryRecord
from middleware.experiments import Experiment, ExperimentStore, experiments_path

T0 = datetime(2026, 12, 1, tzinfo=UTC)

# ------------------------------------------------------------------------------------- distributions


def test_normal_tail_and_quantile_match_known_values():
    assert ab.normal_sf(1.959963984540054) == pytest.approx(0.025, abs=1e-12)
    assert ab.normal_sf(0.0) == 0.5
    assert ab.normal_quantile(0.975) == pytest.approx(1.959963984540054, abs=1e-9)
    assert ab.normal_quantile(0.8) == pytest.approx(0.8416212335729143, abs=1e-9)
    assert ab.normal_quantile(1e-6) == pytest.approx(-4.753424308822899, abs=1e-8)
    with pytest.raises(ValueError, match="strictly between"):
        ab.normal_quantile(1.0)


def test_chi_square_survival_matches_the_tables_and_scipy():
    # the 5% critical values of the tables
    assert ab.chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, abs=1e-12)
    assert ab.chi2_sf(5.991464547107979, 2) == pytest.approx(0.05, abs=1e-12)
    assert ab.chi2_sf(16.918977604620448, 9) == pytest.approx(0.05, abs=1e-12)
    for df in range(1, 12):
        for x in (0.001, 0.5, 1.0, 3.3, 10.0, 25.0, 80.0, 400.0):
            assert ab.chi2_sf(x, df) == pytest.approx(stats.chi2.sf(x, df), rel=1e-9, abs=1e-300)
    assert ab.chi2_sf(0.0, 3) == 1.0
    with pytest.raises(ValueError, match="df"):
        ab.chi2_sf(1.0, 0)


# ------------------------------------------------------------------------------------ textbook pieces


def test_two_proportion_z_test_hand_computed():
    # 100/1000 vs 130/1000: pooled 0.115, se = sqrt(0.115 · 0.885 · 0.002) = 0.014267, z = 0.03 / se
    z, p = ab.two_proportion_z_test(100, 1000, 130, 1000)
    assert z == pytest.approx(2.1027, abs=1e-4)
    assert p == pytest.approx(0.03549, abs=1e-4)
    assert ab.two_proportion_z_test(5, 10, 5, 10) == (0.0, 1.0)


def test_wilson_interval_hand_computed():
    # 81 of 263: centre 0.31075, half-width 0.05546
    low, high = ab.wilson_interval(81, 263)
    assert (low, high) == (pytest.approx(0.25529, abs=1e-5), pytest.approx(0.36621, abs=1e-5))
    low, high = ab.wilson_interval(0, 50)
    assert low == 0.0 and high == pytest.approx(0.07135, abs=1e-4)  # stays above 0 with no successes


def test_sample_size_for_two_proportions_is_the_textbook_figure():
    # 10% -> 12% at alpha 0.05 two-sided, 80% power: 3841 per group (Fleiss, no continuity correction)
    assert ab.sample_size_two_proportions(0.10, 0.20) == 3841
    with pytest.raises(ValueError, match="effect"):
        ab.sample_size_two_proportions(0.10, 0.0)


def test_srm_chi_square_hand_computed():
    chi, p = ab.srm_test([5050, 4950], [50, 50])
    assert chi == pytest.approx(1.0) and p == pytest.approx(0.3173, abs=1e-4)
    chi, p = ab.srm_test([5200, 4800], [50, 50])
    assert chi == pytest.approx(16.0) and p == pytest.approx(6.334e-5, rel=1e-3) and p < ab.SRM_ALPHA
    chi, p = ab.srm_test([600, 300, 100], [60, 30, 10])
    assert chi == 0.0 and p == 1.0


def test_delta_method_with_one_search_per_unit_is_the_binomial_error():
    pairs = [(1.0, 1.0)] * 120 + [(0.0, 1.0)] * 880
    est = ab.ratio_estimate(pairs)
    assert est.value == pytest.approx(0.12)
    assert est.se == pytest.approx(math.sqrt(0.12 * 0.88 / 999))  # the sample variance's n - 1
    assert math.isnan(ab.ratio_estimate([(1.0, 3.0)]).se)


def test_delta_method_error_follows_the_spread_of_clustered_data():
    """Users with their own click propensity: the unit-level error matches the estimator's real spread
    over repeated experiments; the per-search binomial error understates it."""
    rng = random.Random(7)
    values, ses, naive = [], [], []
    for _ in range(300):
        pairs = []
        for _ in range(400):
            propensity = rng.betavariate(0.5, 3.0)  # mean 0.143, very uneven between users
            n = rng.randint(1, 12)
            pairs.append((float(sum(rng.random() < propensity for _ in range(n))), float(n)))
        est = ab.ratio_estimate(pairs)
        values.append(est.value)
        ses.append(est.se)
        naive.append(math.sqrt(est.value * (1 - est.value) / est.denominator))
    spread = float(stats.tstd(values))
    assert sum(ses) / len(ses) == pytest.approx(spread, rel=0.12)
    assert sum(naive) / len(naive) < 0.75 * spread


# ------------------------------------------------------------------------------------------ simulation


def experiment(*traffic: float, exp_id: str = "exp1") -> Experiment:
    names = ["control", "treatment", "third"][: len(traffic)]
    return Experiment.model_validate(
        {"id": exp_id, "variants": [{"name": n, "traffic": t} for n, t in zip(names, traffic, strict=True)]}
    )


def simulate(
    exp: Experiment,
    ctr: dict[str, float],
    *,
    users: int,
    seed: int,
    buy: float = 0.2,
    drop: dict[str, float] | None = None,
) -> tuple[list[QueryRecord], list[Event]]:
    """Users in their sticky variants search 1-8 times; each search gets a click with the variant's
    probability (times a per-user propensity around 1), a click is carted with 0.3 and bought with `buy`.
    `drop`: the share of a variant's users whose records are lost (a logging bug, for the SRM check)."""
    rng = random.Random(seed)
    queries, events = [], []
    for u in range(users):
        user = f"user-{seed}-{u}"
        variant = exp.variant_for(user).name
        if drop and rng.random() < drop.get(variant, 0.0):
            continue
        propensity = rng.uniform(0.5, 1.5)
        for s in range(rng.randint(1, 8)):
            qid = f"{user}-q{s}"
            ts = T0 + timedelta(seconds=u * 10 + s)
            hits = [f"p{rng.randrange(50)}" for _ in range(5)]
            # model_construct: the records are well-formed by construction (and this is many of them)
            queries.append(
                QueryRecord.model_construct(
                    query_id=qid,
                    timestamp=ts,
                    query="q",
                    filters=None,
                    hit_ids=hits,
                    from_=0,
                    total=5,
                    user_id=user,
                    session_id=None,
                    experiment=exp.id,
                    variant=variant,
                )
            )
            events.append(_event(query_id=qid, action="impression", object_id=hits[0], timestamp=ts))
            if rng.random() < min(1.0, ctr[variant] * propensity):
                pos = rng.randrange(5)
                events.append(_event(query_id=qid, action="click", object_id=hits[pos], position=pos + 1, timestamp=ts))
                if rng.random() < 0.3:
                    events.append(_event(query_id=qid, action="add_to_cart", object_id=hits[pos], timestamp=ts))
                    if rng.random() < buy:
                        events.append(_event(query_id=qid, action="purchase", object_id=hits[pos], timestamp=ts))
    return queries, events


def _event(**values) -> Event:
    return Event.model_construct(**{"position": None, "user_id": None, "session_id": None, "value": None, **values})


def test_a_known_effect_is_found_and_an_aa_test_is_not():
    exp = experiment(50, 50)
    queries, events = simulate(exp, {"control": 0.10, "treatment": 0.12}, users=8000, seed=1)
    rep = ab.report(exp, queries, events, mde=0.2)
    control, treatment = rep.variants
    assert control.units + treatment.units == 8000 and not rep.srm
    ctr = treatment.metrics["ctr"]
    assert ctr.p_value is not None and ctr.p_value < 0.001
    assert ctr.lift == pytest.approx(0.2, abs=0.08)
    # the intervals hold the true rates (the propensities average 1)
    assert control.metrics["ctr"].ci_low < 0.10 < control.metrics["ctr"].ci_high
    assert ctr.ci_low < 0.12 < ctr.ci_high
    assert treatment.metrics["clicks_per_search"].value == pytest.approx(ctr.value)  # one click a search at most
    assert next(p for p in rep.power if p.metric == "ctr").enough is True

    same = ab.report(exp, *simulate(exp, {"control": 0.10, "treatment": 0.10}, users=8000, seed=2))
    assert same.variants[1].metrics["ctr"].p_value > 0.01
    assert not same.srm


def test_aa_tests_reject_about_alpha_of_the_time():
    exp = experiment(50, 50)
    rejected = 0
    runs = 40
    for seed in range(runs):
        queries, events = simulate(exp, {"control": 0.2, "treatment": 0.2}, users=600, seed=100 + seed)
        p = ab.report(exp, queries, events).variants[1].metrics["ctr"].p_value
        rejected += p is not None and p < 0.05
    # 5% of 40 runs is 2 expected; more than 6 has a chance of about 1 in 1000 for a calibrated test
    assert rejected <= 6


def test_sample_ratio_mismatch_is_flagged():
    exp = experiment(50, 50)
    rep = ab.report(
        exp, *simulate(exp, {"control": 0.1, "treatment": 0.1}, users=6000, seed=3, drop={"treatment": 0.1})
    )
    assert rep.srm and rep.srm_p < 0.001
    assert any("sample ratio mismatch" in w for w in rep.warnings)
    uneven = experiment(70, 20, 10)
    fine = ab.report(uneven, *simulate(uneven, {"control": 0.1, "treatment": 0.1, "third": 0.1}, users=5000, seed=4))
    assert not fine.srm and [v.name for v in fine.variants] == ["control", "treatment", "third"]


def test_a_small_sample_warns_for_the_effect_asked():
    exp = experiment(50, 50)
    queries, events = simulate(exp, {"control": 0.10, "treatment": 0.11}, users=300, seed=5)
    rep = ab.report(exp, queries, events, mde=0.05)
    check = next(p for p in rep.power if p.metric == "ctr")
    assert check.enough is False and check.units_needed > 10 * check.units_present
    assert any(w.startswith("ctr:") and "5% relative change" in w for w in rep.warnings)
    # asking for a huge effect, the same sample suffices
    big = next(p for p in ab.report(exp, queries, events, mde=3.0).power if p.metric == "ctr")
    assert big.units_needed < check.units_needed


def test_events_off_the_experiment_or_off_the_page_are_counted_not_used():
    exp = experiment(50, 50)
    user = next(f"u{i}" for i in range(100) if exp.variant_for(f"u{i}").name == "treatment")
    queries = [
        QueryRecord(
            query_id="q1", timestamp=T0, hit_ids=["a", "b"], user_id=user, experiment="exp1", variant="treatment"
        ),
        QueryRecord(query_id="q2", timestamp=T0, hit_ids=["a"], user_id=user),  # not exposed
        QueryRecord(query_id="q3", timestamp=T0, hit_ids=["a"], experiment="exp1", variant="control"),  # no unit
    ]
    events = [
        Event(query_id="q1", action="click", object_id="b", timestamp=T0),
        Event(query_id="q1", action="click", object_id="a", timestamp=T0),
        Event(query_id="q1", action="click", object_id="zzz", timestamp=T0),
        Event(query_id="q2", action="click", object_id="a", timestamp=T0),
        Event(query_id="nope", action="purchase", object_id="a", timestamp=T0),
        Event(query_id="q1", action="purchase", object_id="a", timestamp=T0),
    ]
    rep = ab.report(exp, queries, events)
    assert (rep.events_used, rep.events_ignored, rep.events_not_served, rep.searches_without_unit) == (3, 2, 1, 1)
    assert rep.impressions == 0
    treatment = rep.variants[1]
    assert (treatment.units, treatment.searches, treatment.clicks, treatment.purchases) == (1, 1, 2, 1)
    assert treatment.metrics["ctr"].value == 1.0 and treatment.metrics["clicks_per_search"].value == 2.0
    assert rep.variants[0].metrics["ctr"].value is None  # no control units: nothing to compare with
    assert treatment.metrics["ctr"].p_value is None
    json.dumps(rep.to_dict(), allow_nan=False)  # nan never reaches the JSON


def test_bad_parameters_are_refused():
    exp = experiment(50, 50)
    with pytest.raises(ValueError, match="mde"):
        ab.report(exp, [], [], mde=0)
    with pytest.raises(ValueError, match="alpha"):
        ab.report(exp, [], [], alpha=1.5)


# ------------------------------------------------------------------------------------------------ CLI


def _write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(r.model_dump_json(by_alias=True) + "\n" for r in rows), encoding="utf-8")


def test_cli_create_list_stop_report(tmp_path: Path, capsys):
    data = tmp_path / "data"
    spec = tmp_path / "exp.json"
    spec.write_text(json.dumps({"id": "exp1", "variants": [{"name": "control", "traffic": 50},
                                                           {"name": "treatment", "traffic": 50,
                                                            "overlay": {"rerank": False}}]}))  # fmt: skip
    assert main(["--data-dir", str(data), "ab", "create", str(spec)]) == 0
    assert "stored experiment exp1: control 50%, treatment 50%" in capsys.readouterr().out
    assert main(["--data-dir", str(data), "ab", "list"]) == 0
    assert json.loads(capsys.readouterr().out)["variants"][1]["overlay"] == {"rerank": False}
    # an overlapping one, and an unknown overlay key, are refused naming why
    spec2 = tmp_path / "exp2.json"
    spec2.write_text(
        json.dumps({"id": "exp2", "variants": [{"name": "a", "traffic": 50}, {"name": "b", "traffic": 50}]})
    )
    assert main(["--data-dir", str(data), "ab", "create", str(spec2)]) == 2
    assert "overlaps experiment 'exp1'" in capsys.readouterr().err
    bad = [{"name": "a", "traffic": 50}, {"name": "b", "traffic": 50, "overlay": {"colour": 1}}]
    spec2.write_text(json.dumps({"id": "exp2", "variants": bad}))
    assert main(["--data-dir", str(data), "ab", "create", str(spec2)]) == 2
    assert "variants.1.overlay: unknown overlay key 'colour'" in capsys.readouterr().err

    exp = ExperimentStore(experiments_path(data)).get("exp1")
    queries, events = simulate(exp, {"control": 0.10, "treatment": 0.14}, users=3000, seed=9)
    _write_jsonl(tmp_path / "q.jsonl", queries)
    _write_jsonl(tmp_path / "e.jsonl", events)
    args = ["--data-dir", str(data), "ab", "report", "exp1", "--queries", str(tmp_path / "q.jsonl")]
    args += ["--events", str(tmp_path / "e.jsonl")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "experiment exp1 (unit: user, control: control)" in text and "ctr" in text and "sample ratio" in text
    assert main([*args, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["variants"][1]["metrics"]["ctr"]["p_value"] < 0.01 and rep["srm"] is False

    assert main(["--data-dir", str(data), "ab", "stop", "exp1"]) == 0
    assert ExperimentStore(experiments_path(data)).get("exp1").enabled is False
    assert main(["--data-dir", str(data), "ab", "stop", "nope"]) == 2
    assert main(["--data-dir", str(data), "ab", "report", "nope", "--queries", "x", "--events", "y"]) == 2


def test_cli_report_bad_input_names_the_line(tmp_path: Path, capsys):
    data = tmp_path / "data"
    ExperimentStore(experiments_path(data)).put(experiment(50, 50))
    (tmp_path / "q.jsonl").write_text('{"query_id": "q1", "timestamp": "2026-12-01T00:00:00Z"}\n{"query_id": ""}\n')
    (tmp_path / "e.jsonl").write_text("")
    base = ["--data-dir", str(data), "ab", "report", "exp1"]
    assert main([*base, "--queries", str(tmp_path / "q.jsonl"), "--events", str(tmp_path / "e.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "q.jsonl:2:" in err and "query_id" in err
    assert main([*base, "--queries", str(tmp_path / "q.jsonl")]) == 2
    assert "both --queries and --events" in capsys.readouterr().err
    assert main([*base, "--queries", str(tmp_path / "none.jsonl"), "--events", str(tmp_path / "e.jsonl")]) == 2
    assert (
        main([*base, "--mde", "-1", "--queries", str(tmp_path / "e.jsonl"), "--events", str(tmp_path / "e.jsonl")]) == 2
    )


def test_cli_report_reads_the_event_log_of_the_data_directory(tmp_path: Path, capsys):
    data = tmp_path / "data"
    exp = experiment(50, 50)
    ExperimentStore(experiments_path(data)).put(exp)
    args = ["ab", "report", "exp1", "--data-dir", str(data), "--json"]
    try:
        from middleware.events.store import open_event_log
    except ModuleNotFoundError as err:
        assert err.name == "middleware.events.store"
        assert main(args) == 1
        assert "no event log (middleware.events.store)" in capsys.readouterr().err
        return
    from middleware.config import Settings

    queries, events = simulate(exp, {"control": 0.10, "treatment": 0.14}, users=3000, seed=11)
    log = open_event_log(Settings(data_dir=data, embedder="none", reranker="none"))
    try:
        log.log_queries([QueryRecord.model_validate(q.model_dump(by_alias=True)) for q in queries])
        log.append_events([Event.model_validate(e.model_dump()) for e in events])
    finally:
        log.close()
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    assert sum(v["searches"] for v in rep["variants"]) == len(queries)
    assert rep["variants"][1]["metrics"]["ctr"]["p_value"] < 0.01
