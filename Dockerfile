# cut-pipeline on CUDA PyTorch: the image the manifests in k8s/ run.
#
#   docker build -t cut-pipeline:0.1.0 .        # the tag is the package version (pyproject.toml)
#   docker build --build-arg EXTRAS=export,ray -t cut-pipeline:0.1.0-ray .   # with Ray, for the RayJob
#
# The base image brings CUDA, cuDNN and a CUDA build of torch; the install keeps that torch (it is
# pinned to the base's version while the package and its other dependencies are installed). Another
# base: --build-arg BASE_IMAGE=pytorch/pytorch:<version>-cuda<x.y>-cudnn9-runtime.
ARG BASE_IMAGE=pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# The package's extras to install (pyproject.toml): export (onnx, onnxruntime) by default; export,ray
# adds Ray (jobs.infer --executor ray, k8s/base/infer-ray), which the default image leaves out.
ARG EXTRAS=export

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/cut

# Dependencies first, in a layer that only pyproject.toml invalidates: install the package from
# empty stand-ins of its top-level packages, then drop the stand-ins.
COPY pyproject.toml README.md ./
RUN python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/keep-torch.txt \
 && mkdir cut pipeline jobs \
 && touch cut/__init__.py pipeline/__init__.py jobs/__init__.py \
 && pip install -c /tmp/keep-torch.txt ".[${EXTRAS}]" \
 && pip uninstall -y cut-pipeline \
 && rm -rf cut pipeline jobs build ./*.egg-info

# The code (a regular, non-editable install) and the configs (also mounted by k8s from a ConfigMap).
COPY cut ./cut
COPY pipeline ./pipeline
COPY jobs ./jobs
COPY configs ./configs
RUN pip install --no-deps -c /tmp/keep-torch.txt . \
 && rm -rf build ./*.egg-info cut pipeline jobs \
 && python -c "import cut, pipeline, jobs.train, jobs.infer, jobs.shard" \
 && case ",${EXTRAS}," in *,ray,*) ray --version && python -c "import ray.data" ;; esac

# No C++ compiler here (a runtime base image): cut/fast's native CPU kernels (Winograd convolutions)
# stay off, and the first CPU float32 convolution logs "no C++ compiler (c++): native CPU kernels
# off". GPU work never uses them; CPU training and inference run torch's own convolutions, same
# math, slower. For CPU nodes, a devel base image (or apt-get install g++) turns them on.
# A fixed numeric non-root user: Kubernetes checks runAsNonRoot against the number, and the
# manifests set the same runAsUser. HOME under /tmp: the root filesystem is read-only in k8s.
RUN groupadd --gid 10001 cut \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin cut
USER 10001:10001
ENV HOME=/tmp
# FID/KID weights: mount or bake pt_inception-2015-12-05-6726825d.pth into /opt/torch/hub/checkpoints/
# (or set CUT_INCEPTION_WEIGHTS to its path or URL); docs/quality.md.
ENV TORCH_HOME=/opt/torch

# The manifests give every container its command; this one only documents the entry points.
CMD ["python", "-m", "jobs.train", "--help"]
