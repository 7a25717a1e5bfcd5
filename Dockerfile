# One image for every process: worker, beat, flower and the sandbox differ only in their command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY worker worker
COPY tasks tasks
COPY sandbox sandbox
RUN pip install --no-cache-dir .
ENV PYTHONUNBUFFERED=1
CMD ["celery", "-A", "worker.app", "worker", "-Q", "ingest,flush,poll,sweep,backfill"]
