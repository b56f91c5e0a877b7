#!/usr/bin/env bash
# Installs what FrugalMoE builds against, and only what is missing:
# LibTorch through PyPI's torch==2.11.0 wheel (and transformers + safetensors for the
# Hugging Face parity test), everything else from Debian.
# The CUDA toolkit (/usr/local/cuda: nvcc 13, NCCL, cuBLASLt) is expected to be there already.
set -euo pipefail

debs=(libopenmpi-dev openmpi-bin libyaml-cpp-dev libabsl-dev libgtest-dev libbenchmark-dev
      libsentencepiece-dev nlohmann-json3-dev zlib1g-dev cmake ninja-build ccache dict-gcide python3-pip gnuplot-nox
      slurmd slurmctld slurm-client munge)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "setup: Debian packages present"
fi

if python3 -c 'import torch, sys; sys.exit(0 if torch.__version__.split("+")[0] == "2.11.0" else 1)' 2>/dev/null; then
  echo "setup: torch 2.11.0 present"
else
  echo "setup: installing torch==2.11.0 from PyPI (its bundled LibTorch is what we link)"
  python3 -m pip install --quiet torch==2.11.0
fi
# For the Hugging Face parity test (tests/e2e/hf_checkpoints.sh): transformers builds the reference models.
if python3 -c 'import transformers, safetensors, sys; sys.exit(0 if transformers.__version__ == "5.24.0" else 1)' 2>/dev/null; then
  echo "setup: transformers 5.24.0 present"
else
  echo "setup: installing transformers==5.24.0 and safetensors==0.8.0 from PyPI"
  python3 -m pip install --quiet transformers==5.24.0 safetensors==0.8.0 ||
    { echo "setup: error: pip could not install transformers==5.24.0 and safetensors==0.8.0 (the Hugging Face parity test needs them)" >&2; exit 1; }
fi
if [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "setup: CUDA toolkit found at /usr/local/cuda (the CUDA path will be built)"
else
  echo "setup: no CUDA toolkit at /usr/local/cuda (CPU-only build)"
fi
