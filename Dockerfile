# The metering proxy as a slim, non-root image. docker-compose.yml runs it with Prometheus,
# Alertmanager and Grafana; alone:
#   docker build -t deepseek-proxy .
#   docker run -e DEEPSEEK_API_KEY -p 127.0.0.1:8080:8080 -v proxy-data:/app/data deepseek-proxy
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# System tzdata as well as the Python tzdata package (a dependency): billing periods and peak
# hours are judged on the Asia/Shanghai calendar.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tzdata \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install . && rm -rf build proxy ./*.egg-info

# The price book and the container's configuration (listens on 0.0.0.0, ledger on /app/data);
# docker-compose.yml mounts the repository's copies over them so edits need no rebuild.
COPY config/pricing ./config/pricing
COPY config/proxy.docker.yaml ./config/proxy.yaml

RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin proxy \
    && mkdir -p /app/data \
    && chown proxy:proxy /app/data
USER proxy

# The ledger (SQLite): keep it on a volume, it is the record of every call's cost.
VOLUME ["/app/data"]
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

CMD ["python", "-m", "proxy", "serve", "--config", "/app/config/proxy.yaml"]
