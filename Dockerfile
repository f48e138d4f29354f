# One image for every redserve process; compose.yaml picks the command.
# EXTRAS=hf adds the transformers engine (torch, transformers).
FROM python:3.11-slim
ARG EXTRAS=""
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY broker broker
COPY workers workers
COPY gateway gateway
COPY ui ui
COPY redserve redserve
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"
EXPOSE 8000
CMD ["redserve", "up", "--host", "0.0.0.0"]
