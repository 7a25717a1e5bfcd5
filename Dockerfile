# Production image (`docker build .`, the last stage): the product only, worker/ and tasks/ installed
# from the wheel (non-editable, no sandbox). Worker, beat, Flower and the webhook receiver differ only
# in their command. `docker build --target sandbox .` adds the local Attentive sandbox (compose, demos).
FROM python:3.11-slim AS app
# Build from a throw-away copy so processes run the installed package, not a source tree in their cwd.
COPY pyproject.toml README.md /src/
COPY worker /src/worker
COPY tasks /src/tasks
RUN pip install --no-cache-dir /src && rm -rf /src
WORKDIR /app
# Only the settings pointer, so `celery --config celeryconfig` works here as in a checkout.
COPY celeryconfig.py ./
ENV PYTHONUNBUFFERED=1
# Processes run as an unprivileged user (no home, no login shell); nothing in the image is writable
# by it. `celery beat` writes its schedule file to /tmp (`-s /tmp/celerybeat-schedule`).
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app
USER 10001:10001
# The default command is a worker, so is the default check: its heartbeat (written to Redis every
# few seconds) is recent. Other commands of this image (beat, flower, the webhook receiver, metrics)
# set their own check: see docker-compose.yml and `attentive-export health --help`.
HEALTHCHECK --interval=15s --timeout=10s --start-period=30s --retries=3 \
    CMD ["attentive-export", "health", "worker", "--quiet"]
# Warm shutdown on SIGTERM (the default stop signal): running tasks finish or hand over
# (worker/shutdown.py), bounded by the task time limits: `docker stop -t 180` never cuts one short.
CMD ["celery", "-A", "worker.app", "worker", "-Q", "ingest,flush,poll,sweep,backfill"]

# The local Attentive sandbox (its own distribution, sandbox/pyproject.toml): for compose and demos only.
FROM app AS sandbox
USER root
COPY sandbox /src/sandbox
RUN pip install --no-cache-dir /src/sandbox && rm -rf /src
USER 10001:10001
EXPOSE 8787
HEALTHCHECK --interval=10s --timeout=5s --retries=3 \
    CMD ["attentive-export", "health", "webhook", "--quiet", "--url", "http://127.0.0.1:8787/_sandbox/options"]
CMD ["python", "-m", "sandbox", "--host", "0.0.0.0", "--port", "8787", "--token", "demo-key", "--lytics-token", "demo-lytics-token"]

# Last stage, so a plain `docker build .` yields the production image without the sandbox.
FROM app AS production
