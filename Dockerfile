# The service image: `taskqueue serve` by default; docker-compose.yml runs it as
# a one-shot `taskqueue migrate`, the API and worker nodes.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so a source change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir queue_service simulator && touch queue_service/__init__.py simulator/__init__.py \
    && pip install . && pip uninstall -y smart-task-queue

# migrations/ sits beside the package (the service applies it at start), so the
# project is installed in place rather than copied into site-packages.
COPY queue_service ./queue_service
COPY simulator ./simulator
COPY migrations ./migrations
RUN pip install --no-deps -e .

# No root at run time. Without DATABASE_URL the embedded PostgreSQL keeps its
# files in a folder nobody may write (the compose file always sets the URL).
ENV TASKQUEUE_DATA_DIR=/tmp/taskqueue-data
USER nobody
EXPOSE 8000
CMD ["taskqueue", "serve", "--host", "0.0.0.0", "--port", "8000"]
