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
CMD ["celery", "-A", "worker.app", "worker", "-Q", "ingest,flush,poll,sweep,backfill"]

# The local Attentive sandbox (its own distribution, sandbox/pyproject.toml): for compose and demos only.
FROM app AS sandbox
COPY sandbox /src/sandbox
RUN pip install --no-cache-dir /src/sandbox && rm -rf /src
EXPOSE 8787
CMD ["python", "-m", "sandbox", "--host", "0.0.0.0", "--port", "8787", "--token", "demo-key"]

# Last stage, so a plain `docker build .` yields the production image without the sandbox.
FROM app AS production
