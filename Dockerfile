# persona-ops on the embedded model (CPU). Build: docker build -t persona-ops .
# Run the default pipeline: docker run --rm persona-ops make run
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
RUN git init -q 2>/dev/null || true; make install && .venv/bin/python -c "from persona_ops.models.loading import embedded_model_dir; embedded_model_dir()"
ENV PATH=/app/.venv/bin:$PATH PREFECT_SERVER_ANALYTICS_ENABLED=false
CMD ["persona-ops", "--help"]
