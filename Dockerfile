# hpo worker / dashboard image. The base image brings CUDA and a matching torch, so installing
# hpo does not pull another multi-GB torch build.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /app
COPY pyproject.toml README.md ./
COPY hpo ./hpo
COPY studies ./studies
RUN pip install --no-cache-dir '.[postgres]'
# Your own training code (train:, model:, data: in a study) must be importable in the workers:
# install it here too, e.g. COPY mypkg ./mypkg and RUN pip install --no-cache-dir ./mypkg

# Checkpoints and models: a volume shared by every worker and the dashboard.
ENV HPO_ARTIFACTS=/artifacts PYTHONUNBUFFERED=1
VOLUME ["/artifacts"]

# hpo turns SIGTERM (docker stop) into a clean stop: the trial in flight is queued for a retry.
STOPSIGNAL SIGTERM
CMD ["hpo", "--help"]
