# gpt-lightning on a CUDA PyTorch image. Build and pre-train on every GPU of the host with DDP:
#   docker build -t gpt-lightning .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/app/runs" -v "$PWD/data:/app/data" gpt-lightning \
#     python main.py fit --config configs/pretrain.yaml --config configs/trainer/ddp.yaml
# The default command pre-trains the baby GPT on one GPU. Mount data/ with tinyshakespeare/input.txt
# in it to run without network; runs/ keeps the logs and checkpoints outside the container.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

WORKDIR /app
ENV PYTHONUNBUFFERED=1

# Dependencies first, so code changes do not reinstall them. The image's torch satisfies the
# requirement and is kept.
COPY pyproject.toml README.md ./
COPY gpt_lightning/__init__.py gpt_lightning/__init__.py
RUN pip install --no-cache-dir -e . && rm -rf /root/.cache

COPY gpt_lightning gpt_lightning
COPY configs configs
COPY main.py ./

VOLUME ["/app/runs", "/app/data"]
CMD ["python", "main.py", "fit", "--config", "configs/pretrain.yaml"]
