"""Test-model factory: tiny random-init models with locally trained tokenizers (no downloads).

Support for tests/ and benchmarks/, not shipped with the package. Random weights: embeddings and
scores carry no meaning, only shapes, numerics and plumbing can be checked with them. Everything is
seeded, so the same call gives the same files.

- `make_tiny_bert`: BertModel (bge-style embedder), WordPiece tokenizer, CLS pooling by default.
- `make_tiny_xlmr`: XLMRobertaForSequenceClassification with one label (bge-reranker-style).
- `make_full_bge_embedder` / `make_full_bge_reranker`: the exact architectures of
  bge-large-zh-v1.5 and bge-reranker-v2-m3, random-init, for speed and memory benchmarks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

# Product-text corpus the test tokenizers are trained on: Chinese and English titles,
# descriptions and queries of the kind the middleware sees.
PRODUCT_CORPUS: tuple[str, ...] = (
    "送女友的轻奢小众手表",
    "小众设计师珐琅手表 女士 礼盒装 生日礼物",
    "欧米茄 Omega 女士 18K 金 机械手表 蝶飞系列",
    "DW 丹尼尔惠灵顿 情侣手表 简约 石英表 一对",
    "卡西欧 Casio G-SHOCK 运动手表 防水 防震 男士",
    "Apple Watch Series 9 智能手表 GPS 45mm 午夜色",
    "天梭 Tissot 男士 机械表 力洛克系列 自动上链",
    "华为手环 8 NFC 版 心率 血氧 睡眠监测",
    "小米手表 S3 eSIM 版 蓝牙通话 长续航",
    "无线蓝牙耳机 降噪 入耳式 超长续航 苹果安卓通用",
    "索尼 Sony WH-1000XM5 头戴式 主动降噪 耳机",
    "华为 Mate 60 Pro 手机 12GB+512GB 雅丹黑",
    "iPhone 15 Pro Max 256GB 原色钛金属 5G 手机",
    "小米 Redmi K70 游戏手机 骁龙 8 Gen 2",
    "联想 ThinkPad X1 Carbon 轻薄笔记本电脑 14 英寸",
    "机械键盘 青轴 RGB 背光 有线 游戏键盘",
    "罗技 Logitech MX Master 3S 无线鼠标 静音",
    "纯棉短袖 T 恤 男 夏季 宽松 白色 圆领",
    "连衣裙 女 夏 碎花 雪纺 法式 复古 长裙",
    "羽绒服 女 中长款 加厚 白鸭绒 冬季 保暖",
    "耐克 Nike Air Max 270 男子 运动鞋 跑步鞋",
    "阿迪达斯 adidas 三叶草 板鞋 小白鞋 情侣款",
    "兰蔻 小黑瓶 精华液 50ml 修护 保湿 护肤品",
    "雅诗兰黛 Estee Lauder 特润修护肌活精华露",
    "迪奥 Dior 口红 999 哑光 正红色 礼盒",
    "香奈儿 Chanel 香水 可可小姐 淡香精 50ml",
    "婴儿纸尿裤 L 码 超薄 透气 干爽 100 片",
    "有机奶粉 3 段 幼儿配方 800g 罐装",
    "五常大米 稻花香 5kg 东北 新米 真空包装",
    "茅台 飞天 53 度 酱香型 白酒 500ml",
    "三只松鼠 坚果 大礼包 每日坚果 零食 送礼",
    "保温杯 316 不锈钢 大容量 男女 学生 便携",
    "不粘锅 炒锅 家用 麦饭石 电磁炉 燃气通用",
    "戴森 Dyson V12 无线吸尘器 家用 大吸力",
    "美的 Midea 变频 空调 1.5 匹 一级能效 挂机",
    "乐高 LEGO 积木 城市系列 警察局 儿童 玩具 礼物",
    "瑜伽垫 加厚 加宽 防滑 健身垫 初学者",
    "户外 登山包 双肩 防水 大容量 旅行 背包",
    "wireless bluetooth earbuds with noise cancelling and long battery life",
    "stainless steel vacuum insulated water bottle 32 oz",
    "women's minimalist leather strap watch gift box",
    "men's automatic mechanical watch sapphire crystal",
    "smart watch fitness tracker heart rate sleep monitor",
    "cotton crew neck t-shirt for men summer casual",
    "running shoes lightweight breathable cushioning",
    "ergonomic wireless mouse silent click rechargeable",
    "mechanical gaming keyboard rgb backlit blue switches",
    "organic green tea loose leaf 500g gift tin",
    "kids building blocks toy set birthday present",
    "non-stick frying pan induction compatible 28cm",
    "gift for girlfriend elegant niche designer jewelry",
    "best budget phone with good camera and battery",
    "lightweight laptop for students 14 inch ssd",
    "为这个句子生成表示以用于检索相关文章：",
    "轻奢 小众 设计 礼物 女友 生日 纪念日 情人节",
    "正品 包邮 官方 旗舰店 限时 优惠 新款 热卖",
    "价格 销量 库存 品牌 类目 评价 好评 退换",
)


def _write_corpus_iter() -> Iterable[str]:
    # several passes so the trainers see every pair often enough to keep merges stable
    for _ in range(4):
        yield from PRODUCT_CORPUS


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------- tokenizers


def save_bert_tokenizer(tok: Any, out_dir: Path, *, model_max_length: int = 512) -> None:
    """Save a Rust tokenizer as BertTokenizerFast, the class of bge-large-zh-v1.5's tokenizer."""
    from transformers import BertTokenizerFast

    BertTokenizerFast(
        tokenizer_object=tok,
        do_lower_case=True,
        tokenize_chinese_chars=True,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    ).save_pretrained(out_dir)


def save_xlmr_tokenizer(tok: Any, out_dir: Path, *, model_max_length: int = 512) -> None:
    """Save a Rust tokenizer as XLMRobertaTokenizerFast, the class of bge-reranker-v2-m3's tokenizer.

    The class matters: FlagReranker builds pairs with the class's `build_inputs_with_special_tokens`,
    which the generic PreTrainedTokenizerFast leaves without <s>/</s>.
    """
    from transformers import XLMRobertaTokenizerFast

    XLMRobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    ).save_pretrained(out_dir)


def train_wordpiece_tokenizer(out_dir: Path, *, model_max_length: int = 512) -> int:
    """A bge/BERT-style WordPiece tokenizer saved to `out_dir`; returns its vocabulary size.

    The vocabulary is built from the corpus as the tokenizers library normalises and pre-tokenises
    it (every character, its `##` continuation, every whole word), not by the WordPiece trainer:
    the trainer breaks count ties differently in each process, and test models must be reproducible.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: set[str] = set()
    for text in PRODUCT_CORPUS:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    pieces = [*chars, *(f"##{c}" for c in chars), *sorted(w for w in words if len(w) > 1)]
    vocab = {token: i for i, token in enumerate([*specials, *pieces])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    save_bert_tokenizer(tok, out_dir, model_max_length=model_max_length)
    return tok.get_vocab_size()


XLMR_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def unigram_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """An XLM-R-kind Rust tokenizer (Unigram + NFKC + Metaspace) trained on `texts`: specials
    <s> <pad> </s> <unk> <mask> get ids 0..4 (pad = 1), pairs are `<s> A </s> </s> B </s>`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        texts, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(XLMR_SPECIALS), unk_token="<unk>")
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return tok


def train_unigram_tokenizer(out_dir: Path, *, vocab_size: int = 1500, model_max_length: int = 512) -> int:
    """The factory's XLM-R-style tokenizer, trained on PRODUCT_CORPUS and saved reproducibly to
    `out_dir`; returns its vocab size."""
    from tokenizers import models

    tok = unigram_tokenizer(_write_corpus_iter(), vocab_size)
    # The trainer's piece order and the scores it gives rare characters vary between processes:
    # rebuild the model with specials first, then pieces by score rounded to 0.1 and text, so the
    # files are reproducible (coarse scores are plenty for a test tokenizer).
    trained = json.loads(tok.to_str())["model"]["vocab"]
    scores = {piece: round(score, 1) for piece, score in trained}
    ordered = sorted((p for p in scores if p not in XLMR_SPECIALS), key=lambda p: (-scores[p], p))
    tok.model = models.Unigram([(p, 0.0) for p in XLMR_SPECIALS] + [(p, scores[p]) for p in ordered], unk_id=3)
    save_xlmr_tokenizer(tok, out_dir, model_max_length=model_max_length)
    return tok.get_vocab_size()


# ---------------------------------------------------------------------------------------- pooling config


def write_sentence_transformers_config(out_dir: Path, *, pooling: Literal["cls", "mean"], dim: int) -> None:
    """modules.json + 1_Pooling/config.json (+ 2_Normalize) as sentence-transformers saves them."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling_config = {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (out_dir / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (out_dir / "2_Normalize").mkdir(parents=True, exist_ok=True)
    (out_dir / "modules.json").write_text(json.dumps(modules, indent=2))
    (out_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config, indent=2))
    (out_dir / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"}, indent=2)
    )
    (out_dir / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 512, "do_lower_case": False}, indent=2)
    )


# ---------------------------------------------------------------------------------------- models


def _bert_config(vocab_size: int, **arch: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, pad_token_id=0, **arch)


def _save_bert(
    out_dir: Path,
    *,
    seed: int,
    arch: dict[str, Any],
    model_vocab_size: int | None,
    pooling: Literal["cls", "mean"] | None,
) -> Path:
    from transformers import BertModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_vocab = train_wordpiece_tokenizer(out_dir, model_max_length=arch["max_position_embeddings"])
    _seed_everything(seed)
    config = _bert_config(model_vocab_size or tok_vocab, **arch)
    model = BertModel(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    if pooling is not None:
        write_sentence_transformers_config(out_dir, pooling=pooling, dim=config.hidden_size)
    return out_dir


def _save_xlmr(out_dir: Path, *, seed: int, arch: dict[str, Any], model_vocab_size: int | None) -> Path:
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # XLM-R positions start after padding_idx (1): max_position_embeddings = max tokens + 2
    tok_vocab = train_unigram_tokenizer(out_dir, model_max_length=arch["max_position_embeddings"] - 2)
    _seed_everything(seed)
    config = XLMRobertaConfig(
        vocab_size=model_vocab_size or tok_vocab,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        num_labels=1,
        **arch,
    )
    model = XLMRobertaForSequenceClassification(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


TINY_ARCH: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    # BERT's usual 0.02 makes a model this small give near-identical outputs for every input
    # (reranker logits within 1e-5 of each other); 0.2 spreads them (std ≈ 0.1 over product
    # titles) so rank checks mean something (INT8 error against that spread: tests/test_models.py)
    "initializer_range": 0.2,
}


def make_tiny_bert(out_dir: str | Path, *, seed: int = 0, pooling: Literal["cls", "mean"] | None = None) -> Path:
    """Tiny random BertModel + WordPiece tokenizer. `pooling` also writes sentence-transformers files
    (modules.json, 1_Pooling/config.json); None leaves a plain transformers directory (CLS default)."""
    return _save_bert(
        Path(out_dir),
        seed=seed,
        arch={**TINY_ARCH, "max_position_embeddings": 512},
        model_vocab_size=None,
        pooling=pooling,
    )


def make_tiny_xlmr(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Tiny random XLMRobertaForSequenceClassification (num_labels=1) + Unigram tokenizer."""
    return _save_xlmr(
        Path(out_dir), seed=seed, arch={**TINY_ARCH, "max_position_embeddings": 514}, model_vocab_size=None
    )


# exact architectures of the production models (random weights: for benchmarks only)
BGE_LARGE_ZH_ARCH: dict[str, Any] = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "max_position_embeddings": 512,
}
BGE_LARGE_ZH_VOCAB = 21128
BGE_RERANKER_V2_M3_ARCH: dict[str, Any] = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "max_position_embeddings": 8194,
}
BGE_RERANKER_V2_M3_VOCAB = 250002


def make_full_bge_embedder(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Random-init model with bge-large-zh-v1.5's exact config (BertModel large, CLS pooling)."""
    return _save_bert(
        Path(out_dir),
        seed=seed,
        arch=BGE_LARGE_ZH_ARCH,
        model_vocab_size=BGE_LARGE_ZH_VOCAB,
        pooling="cls",
    )


def make_full_bge_reranker(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Random-init model with bge-reranker-v2-m3's exact config (XLM-R large, one logit)."""
    return _save_xlmr(Path(out_dir), seed=seed, arch=BGE_RERANKER_V2_M3_ARCH, model_vocab_size=BGE_RERANKER_V2_M3_VOCAB)
