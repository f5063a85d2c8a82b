# The shopsearch middleware (CLI + server), CPU build.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
# torch first and pinned: an unpinned torch would pull a CUDA build
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY middleware ./middleware
COPY loaders ./loaders
COPY benchmarks ./benchmarks
COPY index_templates ./index_templates
RUN pip install ".[cpu]"
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --retries=10 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"
# the app factory reads SHOPSEARCH_* (backend, OpenSearch URL, models); `docker compose run middleware
# shopsearch opensearch init` etc. run the CLI in the same image
CMD ["uvicorn", "middleware.server.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8080"]
