# syntax=docker/dockerfile:1
# Build: a wheel with its dependencies in a virtualenv; run: slim Python, non-root, no compilers.
FROM python:3.12-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY service ./service
COPY migrations ./migrations
RUN /opt/venv/bin/pip install .

FROM python:3.12-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system chat && useradd --system --gid chat --home-dir /var/lib/chat chat \
    && mkdir -p /var/lib/chat && chown chat:chat /var/lib/chat
COPY --from=build /opt/venv /opt/venv
USER chat
WORKDIR /var/lib/chat
ENV CHAT_DATA_DIR=/var/lib/chat/data
# The command below listens on 0.0.0.0: dev logins (anyone signs in as anyone), /metrics and
# /docs stay off unless asked for (CHAT_DEV_AUTH, CHAT_METRICS_TOKEN, CHAT_PUBLIC_DOCS).
ENV CHAT_DEV_AUTH=false
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
ENTRYPOINT ["chat-service"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
