"""Lightning glue: a classifier module, a datamodule over ``privml.data``, and the ``privml fit`` CLI.

Training configs are LightningCLI YAML files (see ``configs/``); their ``ModelCheckpoint`` callback
names a fixed file (``dirpath`` + ``filename``) so :func:`train_or_load` can find a trained model
again without retraining. Checkpoints carry the inner model's ``class_path``/``init_args`` so
:func:`load_model_from_checkpoint` rebuilds the plain ``nn.Module`` on its own.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, Dataset, random_split

from privml.data import DATASETS, get_dataset
from privml.errors import InvalidInput, MalformedInput, PrivmlError

TRUSTED_MODULES = ("privml", "models", "torchvision.models")
"""Where a config's or checkpoint's model ``class_path`` may point without the user allowing more."""
_MAX_ARG_ITEMS = 10_000
_MAX_ARG_DEPTH = 16
_MAX_STR_LEN = 4096
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine")
SPEC_KEY = "privml_model_spec"


def _in_modules(dotted: str, prefixes: Sequence[str]) -> bool:
    """True if ``dotted`` is one of the module prefixes or lies below one (``models`` covers ``models.x.Y``)."""
    return any(dotted == p or dotted.startswith(p + ".") for p in (q.rstrip(".") for q in prefixes if q))


def _check_init_args(value: Any, where: str, depth: int = 0, seen: list[int] | None = None) -> None:
    """Refuse init_args that are not plain JSON data (None, bool, int, float, str, lists, str-keyed dicts)."""
    seen = [0] if seen is None else seen
    seen[0] += 1
    if seen[0] > _MAX_ARG_ITEMS or depth > _MAX_ARG_DEPTH:
        raise InvalidInput(f"{where}: init_args too large or too deeply nested")
    if value is None or isinstance(value, (bool, int, float)):
        return
    if isinstance(value, str):
        if len(value) > _MAX_STR_LEN:
            raise InvalidInput(f"{where}: an init_args string is longer than {_MAX_STR_LEN} characters")
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_init_args(item, where, depth + 1, seen)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInput(f"{where}: init_args keys must be strings, got {type(key).__name__}")
            _check_init_args(item, where, depth + 1, seen)
        return
    raise InvalidInput(f"{where}: init_args may hold only JSON scalars, lists and dicts, not {type(value).__name__}")


def check_model_spec(spec: Any, allowed: Sequence[str] = (), where: str = "model spec") -> dict[str, Any]:
    """Check a ``{"class_path": ..., "init_args": {...}}`` spec before anything is imported or built.

    ``class_path`` must be a dotted path inside :data:`TRUSTED_MODULES` or a module prefix in
    ``allowed`` (e.g. ``("mypkg",)``); ``init_args`` must be plain JSON data. Raises ``InvalidInput``.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise InvalidInput(f"{where}: expected {{'class_path': ..., 'init_args': {{...}}}}, got {spec!r:.200}")
    extra = set(spec) - {"class_path", "init_args"}
    if extra:
        raise InvalidInput(f"{where}: unexpected keys {sorted(extra)} besides class_path and init_args")
    path = spec["class_path"]
    prefixes = (*TRUSTED_MODULES, *allowed)
    if "." not in path or not _in_modules(path, prefixes):
        raise InvalidInput(
            f"{where}: class_path {path!r:.200} is outside the trusted modules {list(prefixes)}; configs and "
            f"checkpoints are trusted input, so allow its module explicitly if you trust this file: "
            f"allowed=({path.rsplit('.', 1)[0]!r},) in Python, --allow-module {path.rsplit('.', 1)[0]} on the CLI"
        )
    init_args = spec.get("init_args", {})
    if init_args is not None and not isinstance(init_args, dict):
        raise InvalidInput(f"{where}: init_args must be a mapping, got {type(init_args).__name__}")
    _check_init_args(init_args, where)
    return spec


class ClassifierModule(L.LightningModule):
    """Trains any ``nn.Module`` classifier with cross-entropy; logs train/val loss, ``val_acc``, ``test_acc``.

    ``scheduler="cosine"`` anneals the learning rate to zero over ``trainer.max_epochs``, which makes
    the last epoch's (checkpointed) weights stable on these small data sets. ``range_weight > 0`` adds
    the range penalty of the model's polynomial activations (``privml.nn.range_penalty``): inputs
    leaving their calibrated intervals cost loss (approximation-aware fine-tuning).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        scheduler: str = "none",
        range_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise InvalidInput(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if scheduler not in SCHEDULERS:
            raise InvalidInput(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if lr <= 0 or weight_decay < 0:
            raise InvalidInput(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
        if not range_weight >= 0:
            raise InvalidInput(f"range_weight must be >= 0, got {range_weight}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        # How to rebuild ``model``: {"class_path": ..., "init_args": {...}}. The CLI fills it from the
        # config; code that builds the module by hand may set it, or pass ``model=`` when loading.
        self.model_spec: dict[str, Any] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss_acc(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self.model(x)
        return F.cross_entropy(logits, y), (logits.argmax(dim=1) == y).float().mean()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss_acc(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        if self.hparams.get("range_weight", 0.0) > 0:  # polynomial activations: stay inside their intervals
            from privml.nn import range_penalty

            penalty = range_penalty(self.model)
            self.log("range_penalty", penalty, on_step=False, on_epoch=True)
            loss = loss + self.hparams.range_weight * penalty
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, acc = self._loss_acc(batch)
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_acc", acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, acc = self._loss_acc(batch)
        self.log("test_loss", loss)
        self.log("test_acc", acc)

    def configure_optimizers(self) -> Any:
        lr, wd = self.hparams.lr, self.hparams.weight_decay
        if self.hparams.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
        elif self.hparams.optimizer == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=wd)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=wd)
        if self.hparams.scheduler == "none":
            return opt
        epochs = max(1, self.trainer.max_epochs or 1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[SPEC_KEY] = self.model_spec

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.model_spec = checkpoint.get(SPEC_KEY)


class PrivmlDataModule(L.LightningDataModule):
    """Batches of a ``privml.data`` dataset; the validation set is the test split unless ``val_fraction > 0``."""

    def __init__(
        self,
        dataset: str = "digits",
        batch_size: int = 64,
        seed: int = 0,
        root: str | None = None,
        download: bool = False,
        val_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise InvalidInput(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}")
        if batch_size < 1:
            raise InvalidInput(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise InvalidInput(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.root, self.download, self.val_fraction = root, download, val_fraction
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _load(self) -> tuple[Dataset, Dataset]:
        if self.dataset in ("mnist", "cifar10"):
            return get_dataset(self.dataset, root=self.root, download=self.download)
        return get_dataset(self.dataset, seed=self.seed)

    def prepare_data(self) -> None:
        if self.download:  # fetch once, before any setup
            self._load()

    def setup(self, stage: str | None = None) -> None:
        """Load all splits once (the shipped sets are tiny); later calls are no-ops."""
        if self.train_set is not None:
            return
        train, test = self._load()
        if self.val_fraction > 0:
            n_val = max(1, round(len(train) * self.val_fraction))
            gen = torch.Generator().manual_seed(self.seed)
            train, self.val_set = random_split(train, [len(train) - n_val, n_val], generator=gen)
        else:
            self.val_set = test
        self.train_set, self.test_set = train, test

    def _loader(self, ds: Dataset | None, shuffle: bool = False) -> DataLoader:
        if ds is None:
            raise PrivmlError("PrivmlDataModule.setup() has not run yet")
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)


class PrivmlCLI(LightningCLI):
    """LightningCLI that records the inner model's class_path/init_args on the module for checkpoints.

    Adds a top-level ``num_threads`` option: these models are tiny, and on a busy machine one
    intra-op thread trains them several times faster than torch's default. The model's class must
    lie in :data:`TRUSTED_MODULES` or ``allowed_modules`` (set by :func:`build_cli`).
    """

    allowed_modules: tuple[str, ...] = ()

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--num_threads", type=int | None, default=None, help="torch.set_num_threads for this run"
        )

    def _own_config(self) -> Any:
        return self.config[self.config.subcommand] if "subcommand" in self.config else self.config

    def before_instantiate_classes(self) -> None:
        threads = self._own_config().get("num_threads")
        if threads is not None:
            if threads < 1:
                raise InvalidInput(f"num_threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        spec = self._own_config().get("model.model")
        path = getattr(spec, "class_path", None)
        _resolve_class(check_model_spec({"class_path": path}, self.allowed_modules, "training config model"),
                       self.allowed_modules, "training config model")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        try:
            text = self.parser.dump(self.config, skip_link_targets=False, skip_unset=False)
        except TypeError:  # jsonargparse < 4.49 calls it skip_none
            text = self.parser.dump(self.config, skip_link_targets=False, skip_none=False)
        dump = yaml.safe_load(text)
        if "subcommand" in self.config:
            dump = dump[self.config.subcommand]
        self.model.model_spec = dump["model"]["model"]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Lightning's advice that does not apply here (tiny in-memory sets, CPU only)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        # Lightning 2.6 still calls jsonargparse APIs deprecated in jsonargparse 4.49.
        warnings.filterwarnings("ignore", message="(?s).*was deprecated in v4\\.49")
        warnings.filterwarnings("ignore", message="(?s).*only one JsonargparseDeprecationWarning per type")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
        yield


def build_cli(args: list[str] | None, run: bool = True, allowed: Sequence[str] = ()) -> LightningCLI:
    """Parse ``args`` (e.g. ``["fit", "--config", path]``, or ``["--config", path]`` with ``run=False``).

    With ``run=False`` the model, datamodule and trainer are instantiated but nothing runs, and
    parse errors raise ``InvalidInput`` instead of exiting. ``allowed``: module prefixes the model's
    class may come from besides :data:`TRUSTED_MODULES`.
    """
    cli_class = type("PrivmlCLI", (PrivmlCLI,), {"allowed_modules": tuple(allowed)})
    kwargs: dict[str, Any] = dict(
        subclass_mode_model=False,
        subclass_mode_data=False,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"accelerator": "cpu", "devices": 1},
    )
    with _quiet():
        if run:
            return cli_class(ClassifierModule, PrivmlDataModule, **kwargs)
        try:
            return cli_class(ClassifierModule, PrivmlDataModule, parser_kwargs={"exit_on_error": False}, **kwargs)
        except PrivmlError:
            raise
        except Exception as exc:  # jsonargparse reports bad configs with several exception types
            raise InvalidInput(f"invalid training config ({' '.join(args)}): {exc}") from exc


def cli_main(argv: list[str] | None = None, allowed: Sequence[str] = ()) -> None:
    """``privml fit --config configs/digits_cnn.yaml`` (argv without the program name; None: sys.argv[1:])."""
    args = list(argv) if argv is not None else sys.argv[1:]
    for i, arg in enumerate(args):  # check config files' model specs before jsonargparse imports them
        if arg in ("--config", "-c") and i + 1 < len(args) and Path(args[i + 1]).is_file():
            _precheck_config(Path(args[i + 1]), allowed)
        elif arg.startswith("--config=") and Path(arg.split("=", 1)[1]).is_file():
            _precheck_config(Path(arg.split("=", 1)[1]), allowed)
    build_cli(argv, run=True, allowed=allowed)  # None lets LightningCLI read sys.argv


def checkpoint_path(trainer: L.Trainer) -> Path:
    """The fixed file the trainer's single ``ModelCheckpoint`` writes (``dirpath/filename.ckpt``)."""
    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    if len(callbacks) != 1 or callbacks[0].dirpath is None or "{" in (callbacks[0].filename or "{"):
        raise InvalidInput(
            "a training config needs exactly one ModelCheckpoint callback with a fixed dirpath and filename "
            "(e.g. dirpath: artifacts/digits_cnn, filename: model, enable_version_counter: false)"
        )
    cb = callbacks[0]
    return Path(cb.dirpath) / f"{cb.filename}{cb.FILE_EXTENSION}"


def _resolve_class(spec: dict[str, Any], allowed: Sequence[str], where: str) -> type[nn.Module]:
    """Import a checked spec's class; it must be an ``nn.Module`` class defined in a trusted/allowed module."""
    module_name, _, attr = spec["class_path"].rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidInput(f"{where}: cannot import class_path {spec['class_path']!r}: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise InvalidInput(f"{where}: class_path {spec['class_path']!r} is not an nn.Module class")
    if not _in_modules(obj.__module__, (*TRUSTED_MODULES, *allowed)):
        raise InvalidInput(f"{where}: class_path {spec['class_path']!r} re-exports {obj.__module__}.{obj.__name__}, "
                           f"outside the trusted modules; allow {obj.__module__!r} explicitly if you trust it")
    return obj


def _build_model(spec: dict[str, Any]) -> nn.Module:
    """Instantiate a checked ``{"class_path": ..., "init_args": {...}}`` the way the CLI did (jsonargparse)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(nn.Module, "model", fail_untyped=False)
    try:
        cfg = parser.parse_object({"model": spec})
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
        return instantiate(cfg).model
    except Exception as exc:
        raise MalformedInput(f"cannot rebuild the model from checkpoint spec {spec}: {exc}") from exc


def _probe_shapes(spec: dict[str, Any], cls: type[nn.Module]) -> dict[str, tuple[int, ...]] | None:
    """Parameter/buffer shapes of the spec's model, built on the meta device (nothing allocated).

    None for privml's own wrappers (e.g. ApproximatedModel), which load a checked config of their own.
    """
    if _in_modules(cls.__module__, ("privml",)):
        return None
    with torch.device("meta"):
        probe = _build_model(spec)
    return {k: tuple(v.shape) for k, v in probe.state_dict().items()}


def _spec_differences(expected: dict[str, Any], stored: Any) -> list[str]:
    """``model.model.<field>: config X, checkpoint Y`` for each field where two model specs differ."""
    stored = stored if isinstance(stored, dict) else {}
    diffs = [f"model.model.class_path: config {expected.get('class_path')!r}, checkpoint {stored.get('class_path')!r}"]
    if expected.get("class_path") == stored.get("class_path"):
        a, b = expected.get("init_args") or {}, stored.get("init_args") or {}
        diffs = [f"model.model.init_args.{k}: config {a.get(k)!r}, checkpoint {b.get(k)!r}"
                 for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return diffs


def load_model_from_checkpoint(path: str | Path, model: nn.Module | None = None,
                               allowed: Sequence[str] = (), expected_spec: dict[str, Any] | None = None) -> nn.Module:
    """The trained inner ``nn.Module`` of a ClassifierModule checkpoint, on CPU, in eval mode.

    The model is rebuilt from the spec stored in the checkpoint (a trusted-input check first: its
    class must come from :data:`TRUSTED_MODULES` or ``allowed`` module prefixes, its init_args be plain
    JSON, and its shapes, probed without allocating, those of the stored weights); pass ``model`` (an
    instance of the right architecture) for checkpoints written without one. With ``expected_spec`` (the
    model a config names) a checkpoint trained for another model is refused, naming the fields that differ.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"no checkpoint at {path}; train first (privml fit --config <config>)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        full_state = ckpt["state_dict"]
        state = {k.removeprefix("model."): v for k, v in full_state.items() if k.startswith("model.")}
    except Exception as exc:  # truncated/corrupt zip, bad pickle, wrong structure
        raise MalformedInput(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MalformedInput(f"checkpoint {path}: state_dict entries must be tensors")
    if expected_spec is not None and ckpt.get(SPEC_KEY) != expected_spec:
        diffs = _spec_differences(expected_spec, ckpt.get(SPEC_KEY))
        raise InvalidInput(f"checkpoint {path} was not trained for the model the config names ("
                           + "; ".join(diffs[:4] or ["model.model: the specs differ"]) + "): retrain it (train_or_load("
                           "..., force=True), or delete the checkpoint), or point the config's ModelCheckpoint "
                           "dirpath at a new directory")
    if model is None:
        spec = ckpt.get(SPEC_KEY)
        if spec is None:
            raise InvalidInput(f"checkpoint {path} does not record its model's class; pass model=<an instance>")
        where = f"checkpoint {path}"
        cls = _resolve_class(check_model_spec(spec, allowed, where), allowed, where)
        shapes = _probe_shapes(spec, cls)
        stored = {k: tuple(v.shape) for k, v in state.items()}
        if shapes is not None and shapes != stored:
            diff = sorted(set(shapes.items()) ^ set(stored.items()))[:4]
            raise MalformedInput(f"{where}: its model spec {spec['class_path']} does not fit the stored weights "
                                 f"(differences: {diff}); refusing to build it")
        model = _build_model(spec)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise MalformedInput(f"checkpoint {path} does not fit {type(model).__name__}: {exc}") from exc
    return model.eval()


def _precheck_config(config: Path, allowed: Sequence[str]) -> None:
    """Check a config file's model spec before jsonargparse imports anything it names."""
    try:
        cfg = yaml.safe_load(config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InvalidInput(f"cannot read training config {config}: {exc}") from exc
    spec = cfg.get("model", {}).get("model") if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) else None
    if isinstance(spec, dict):
        check_model_spec(spec, allowed, f"training config {config}")
    elif isinstance(spec, str):
        check_model_spec({"class_path": spec}, allowed, f"training config {config}")


def train_or_load(
    config: str | Path, force: bool = False, overrides: list[str] | None = None, allowed: Sequence[str] = ()
) -> tuple[nn.Module, PrivmlDataModule]:
    """Load the checkpoint named by ``config`` if it exists (and not ``force``), else train by ``config``.

    Returns the plain inner ``nn.Module`` in eval mode and the datamodule with ``setup()`` done.
    ``overrides`` are extra CLI arguments such as ``["--trainer.max_epochs=2"]``. Like ``privml fit``,
    it applies the config's ``seed_everything`` (global RNG seeding) even when it only loads.
    Configs and checkpoints are trusted input: the model's class must come from :data:`TRUSTED_MODULES`
    or the module prefixes in ``allowed`` (e.g. ``("mypkg",)``).
    """
    config = Path(config)
    if not config.is_file():
        raise InvalidInput(f"training config {config} not found")
    _precheck_config(config, allowed)
    threads = torch.get_num_threads()
    with _quiet():
        try:
            cli = build_cli(["--config", str(config), *(overrides or [])], run=False, allowed=allowed)
            model, datamodule = _fit_or_load(cli, force, allowed)
        finally:
            torch.set_num_threads(threads)  # the config's num_threads applies to training only
    datamodule.setup()
    return model.cpu().eval(), datamodule


def _fit_or_load(cli: LightningCLI, force: bool, allowed: Sequence[str] = ()) -> tuple[nn.Module, PrivmlDataModule]:
    ckpt = checkpoint_path(cli.trainer)
    cli.datamodule.checkpoint_path = ckpt  # what was evaluated: reports hash it
    if ckpt.is_file() and not force:
        return load_model_from_checkpoint(ckpt, allowed=allowed, expected_spec=cli.model.model_spec), cli.datamodule
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if not ckpt.is_file():
        raise PrivmlError(f"training finished but wrote no checkpoint at {ckpt}")
    return cli.model.model, cli.datamodule


# ------------------------------------------------------------------------------------------------
# approximation-aware fine-tuning


def _inputs(dataset: Dataset, limit: int | None = None) -> torch.Tensor:
    """The inputs of a (x, y) dataset as one tensor (the first ``limit`` samples)."""
    xs, n = [], 0
    for x, _ in DataLoader(dataset, batch_size=256):
        xs.append(x)
        n += len(x)
        if limit is not None and n >= limit:
            break
    return torch.cat(xs)[:limit]


def _labelled(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*DataLoader(dataset, batch_size=256), strict=True)
    return torch.cat(xs), torch.cat(ys)


_APPROX_OPTIONS = ("max_error", "accuracy_tolerance", "validation", "depth_budget", "degree", "margin", "percentile",
                   "max_degree", "composites", "trainable")


class ApproximatedModel(nn.Module):
    """The trained model of training config ``config``, compiled by ``privml.compile`` for ``backend``.

    Its activations are the polynomials the compiler chose (``degree``, or a budget: ``max_error``,
    ``accuracy_tolerance`` on the validation split, ``depth_budget``), so Lightning can fine-tune the
    network around them: this is how ``privml fit --config configs/finetune_lenet5.yaml`` does
    approximation-aware training. ``train_coefficients`` also trains the polynomials' coefficients;
    ``clamp`` clamps their inputs into the calibrated intervals while training. Compile the result
    again for encrypted use (``privml compile --config ...`` does: the polynomials are kept).
    """

    def __init__(
        self,
        config: str,
        backend: str = "ckks",
        degree: int | None = None,
        max_error: float | None = None,
        accuracy_tolerance: float | None = None,
        depth_budget: int | None = None,
        calib: int = 512,
        margin: float = 0.1,
        train_coefficients: bool = False,
        clamp: bool = True,
    ) -> None:
        super().__init__()
        from privml.compiler.calibrate import calibrate
        from privml.compiler.choose import apply_choice, choose
        from privml.compiler.validate import fix
        from privml.nn import set_trainable

        if backend not in ("ckks", "hybrid"):
            raise InvalidInput(f"ApproximatedModel: backend must be 'ckks' or 'hybrid' (where activations become "
                               f"polynomials), got {backend!r}")
        path = Path(config)
        if not path.is_file() and (Path(__file__).resolve().parents[1] / config).is_file():
            path = Path(__file__).resolve().parents[1] / config  # relative to the repository, from anywhere
        base, dm = train_or_load(path)
        x = _inputs(dm.train_set, calib)
        options: dict[str, Any] = {"degree": degree, "max_error": max_error, "depth_budget": depth_budget,
                                   "accuracy_tolerance": accuracy_tolerance, "margin": margin}
        if accuracy_tolerance is not None:
            options["validation"] = _labelled(dm.val_set)
        options = {k: v for k, v in options.items() if v is not None}
        if not any(k in options for k in ("degree", "max_error", "depth_budget", "accuracy_tolerance")):
            options["degree"] = 4
        # the approximation part of privml.compile (no CKKS parameters yet: compile the fine-tuned model for those)
        gm, _ = fix(base, x[:64])
        choice = choose(gm, calibrate(gm, [x]), backend, x, **options)
        apply_choice(gm, choice)
        # train mode: Lightning keeps each submodule's mode, and the range penalty is recorded in training only
        self.module = set_trainable(gm.train(), coefficients=train_coefficients, clamp=clamp)
        self.choice = {k: v for k, v in choice.summary().items() if k != "targets"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def finetune(
    model: nn.Module,
    datamodule: L.LightningDataModule,
    epochs: int = 3,
    lr: float = 1e-3,
    range_weight: float = 1.0,
    train_coefficients: bool = False,
    clamp: bool = True,
    optimizer: str = "adam",
    seed: int = 0,
    max_steps: int = -1,
) -> nn.Module:
    """Fine-tune a compiled model (or any module holding ``privml.nn`` polynomial activations) with Lightning.

    Approximation-aware training: the network's weights (and the coefficients with
    ``train_coefficients``) adapt to the polynomials standing in for the activations, with the
    range penalty (weight ``range_weight``) keeping the activations' inputs inside the intervals
    the polynomials were fitted on, and ``clamp`` clamping them there while training. Given a
    ``CompiledModel`` it returns a new one, compiled again for the same backend and options on
    the training inputs (fresh ranges and plan); given a module, the fine-tuned module.
    """
    from privml.compiler.api import CompiledModel
    from privml.compiler.api import compile as compile_model
    from privml.nn import APPROX_MODULES, set_trainable

    compiled = model if isinstance(model, CompiledModel) else None
    net = copy.deepcopy(compiled.module if compiled is not None else model)
    if not any(isinstance(m, APPROX_MODULES) for m in net.modules()):
        raise InvalidInput("finetune: the model has no polynomial activations to adapt to; compile it first "
                           "(privml.compile(model, calib, backend='ckks')) and pass the compiled model")
    if epochs < 1 and max_steps < 1:
        raise InvalidInput(f"finetune: need epochs >= 1 (or max_steps >= 1), got epochs={epochs}")
    set_trainable(net.train(), coefficients=train_coefficients, clamp=clamp)  # train mode: penalty and clamp
    module = ClassifierModule(net, lr=lr, optimizer=optimizer, range_weight=range_weight)
    with _quiet():
        L.seed_everything(seed, verbose=False)
        trainer = L.Trainer(max_epochs=max(epochs, 1), max_steps=max_steps, accelerator="cpu", devices=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, deterministic=True, num_sanity_val_steps=0,
                            limit_val_batches=0)
        trainer.fit(module, datamodule=datamodule)
    net = set_trainable(net.cpu().eval(), coefficients=False, clamp=False)
    if compiled is None:
        return net
    options = {k: v for k, v in compiled.plan.config.options().items() if k not in _APPROX_OPTIONS}
    return compile_model(net, _train_inputs(datamodule, 512), backend=compiled.plan.backend, **options)


def _train_inputs(datamodule: L.LightningDataModule, limit: int) -> torch.Tensor:
    """Calibration inputs from any LightningDataModule: its ``train_set`` if it has one, else its train loader.

    ``setup`` gets its stage: LightningDataModule's ``setup(stage)`` has no default.
    """
    datamodule.setup("fit")
    if hasattr(datamodule, "train_set"):
        return _inputs(datamodule.train_set, limit)
    xs, n = [], 0
    for batch in datamodule.train_dataloader():
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        xs.append(x)
        n += len(x)
        if n >= limit:
            break
    return torch.cat(xs)[:limit]


if __name__ == "__main__":
    cli_main()
