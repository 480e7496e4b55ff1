"""The job's settings: a typed schema, YAML files, dotted `key=value` overrides.

Every setting a user can name lives here, with its default and the values it allows.
`load_config` turns a YAML file plus overrides into a validated `Config` or raises
`ConfigError` with one line that names the setting, the bad value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from job.errors import ConfigError


class _Section(BaseModel):
    # Unknown keys are typos, not extensions: reject them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    name: str = "cifar10"
    data_dir: Optional[str] = None  # None: TFDS's own default, which honours TFDS_DATA_DIR
    download: bool = True
    train_split: str = "train[:90%]"
    val_split: Optional[str] = "train[90%:]"
    eval_split: str = "test"
    # Where this worker keeps the images it has read, so later epochs do not read them again:
    # "auto": decoded in memory if they fit in data.memory_share of the container's memory
    # limit, else their encoded bytes in memory ("raw") if those fit, else nothing (decoded
    # as they stream from the record files each epoch); "memory", "raw", "none", or a
    # directory for tf.data's on-disk cache files of decoded images (job.data.cache_file).
    cache: str = "auto"
    # Share of the memory limit (cgroup memory.max / memory.limit_in_bytes, else the machine's
    # memory) that the caches of one node's workers may take together (job.caches).
    memory_share: float = Field(0.5, gt=0.0, le=0.9)
    # Examples in the shuffle buffer, and at most this many MB of their stored bytes.
    shuffle_buffer: int = Field(50_000, ge=1)
    shuffle_buffer_mb: float = Field(256.0, gt=0.0)
    # A folder of your own images, PATH/<split>/<class>/<image>, instead of a TFDS dataset
    # (data.name is then only a label); splits are sliced as TFDS slices them (train[:90%]).
    image_dir: Optional[str] = None
    # Images are cached as uint8 at their own size when they all have one that fits the model
    # input; otherwise (larger, or of varying size) resized once, shorter side to this and
    # centre-cropped square, before caching. null: model.image_size x 8/7 (room to crop).
    cache_image_size: Optional[int] = Field(None, ge=8, le=1024)
    # "auto": flip for images no larger than the model input (CIFAR-10), resized_crop (a random
    # crop of 35-100% of the area and 3:4 to 4:3, then a flip) for larger ones; "flip_crop":
    # flip and a 4-pixel pad-and-crop at the native size.
    augment: Literal["auto", "none", "flip", "flip_crop", "resized_crop"] = "auto"
    # Where the 32x32 -> image_size resize and input scaling run: in tf.data on the host,
    # or inside the train step on the accelerator (the host then ships uint8 32x32 batches).
    resize_on: Literal["host", "device"] = "device"
    # Upscaling to model.image_size: the interpolation, then an unsharp mask of this amount
    # over a sharpen_size box (0: none). Sharper inputs transfer better (job.preprocess.upscale).
    resize_method: Literal["bilinear", "bicubic", "lanczos3", "lanczos5", "nearest", "area"] = "bilinear"
    sharpen: float = Field(0.0, ge=0.0)
    sharpen_size: int = Field(5, ge=3, le=15)

    @field_validator("sharpen_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd (a centred box)")
        return value


class ModelConfig(_Section):
    image_size: int = Field(96, ge=32, le=512)
    alpha: Literal[0.35, 0.5, 0.75, 1.0, 1.3, 1.4] = 1.0
    weights: str = "imagenet"  # "imagenet", "none", or a path to a .h5/.weights.h5 file
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    # Frozen BatchNorm folded into its convolution when training and extracting features
    # (same function, fused kernels; job.model). "auto": where it was measured to help, on a
    # CPU (no GPU visible); off on a GPU, where it has not been measured. false: run the
    # stock Keras layers.
    fold_batchnorm: Union[Literal["auto"], bool] = "auto"
    # Flip test-time augmentation: validation, `evaluate` and the exported model average the
    # class probabilities of each image and its mirror image (twice the inference cost).
    flip_tta: bool = False

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        if value in ("imagenet", "none"):
            return value
        if not value.endswith(".h5"):
            raise ValueError("must be 'imagenet', 'none' or a path to a .h5 weights file")
        return value


class PhaseConfig(_Section):
    epochs: float = Field(ge=0)
    learning_rate: float = Field(gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    warmup_epochs: float = Field(0.0, ge=0)
    # This phase's augmentation; null: data.augment. A head phase without augmentation can
    # train on cached backbone features (train.cache_features).
    augment: Optional[Literal["auto", "none", "flip", "flip_crop", "resized_crop"]] = None
    # Train on this share of data.train_split, its first images (an epoch is a pass over the
    # share). A head on cached features then extracts only the share: a linear head needs far
    # fewer images than fine-tuning does (the quick recipe's head uses a third).
    subset: float = Field(1.0, gt=0.0, le=1.0)


class FinetuneConfig(PhaseConfig):
    # "all" or the number of top backbone layers to unfreeze. BatchNorm stays in inference mode.
    unfreeze: Union[Literal["all"], int] = "all"
    # With unfreeze=N: compute the frozen bottom's output once per image (and per mirror image
    # when the phase flips) and train the top on it, exactly as on images. Memory: one
    # activation per image, e.g. 32 KB at 128 px below block_6 (unfreeze=100).
    cache_frozen: bool = False

    @field_validator("unfreeze")
    @classmethod
    def _unfreeze(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("must be 'all' or a positive number of layers")
        return value


class TrainConfig(_Section):
    # The global batch, split evenly over replicas; see per_replica_batch_size.
    batch_size: int = Field(64, ge=1)
    # If set, the global batch is this times the number of replicas (batch_size is ignored).
    per_replica_batch_size: Optional[int] = Field(None, ge=1)
    # Learning rates are given for `base_batch_size`; with another global batch B they are
    # scaled by sqrt(B / base) ("sqrt", the rule for Adam-family optimizers: docs/ray.md),
    # B / base ("linear", Goyal et al. 2017, for SGD with momentum), or not at all ("none").
    lr_scaling: Literal["sqrt", "linear", "none"] = "none"
    base_batch_size: int = Field(64, ge=1)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    head: PhaseConfig = PhaseConfig(epochs=2, learning_rate=1e-3)
    finetune: FinetuneConfig = FinetuneConfig(epochs=1, learning_rate=1e-4, warmup_epochs=0.1)
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    strategy: Literal["auto", "default", "one_device", "mirrored", "multi_worker_mirrored"] = "auto"
    # Split the host CPU into this many logical devices (lets `mirrored` run on a CPU box).
    cpu_devices: int = Field(1, ge=1, le=64)
    jit_compile: bool = False
    # Refuse to start (exit 2) unless TensorFlow sees a GPU: a GPU recipe must not silently
    # run for hours on the CPU because CUDA did not load.
    require_gpu: bool = False
    steps_per_call: int = Field(1, ge=1, le=1000)
    # Frozen phase without augmentation: compute backbone features once, train the head on
    # them. "auto" does so whenever it is exactly equivalent. (A bool, not "on"/"off": YAML
    # reads on/off as booleans.)
    cache_features: Union[Literal["auto"], bool] = "auto"
    seed: int = 0
    # A resume whose checkpoint holds an optimizer's state for other settings (another
    # optimizer, unfreeze depth, loss scaling) in a phase under way: true restores the weights
    # and starts that optimizer fresh; false refuses (job.resume, README "Resuming").
    reset_optimizer: bool = False


class CheckpointConfig(_Section):
    every_steps: int = Field(200, ge=1)
    keep: int = Field(3, ge=1)


class TelemetryConfig(_Section):
    log_every_steps: int = Field(20, ge=1)
    # Train steps [start, stop) of the phase named in profile_phase traced by the profiler;
    # null turns profiling off.
    profile_steps: Optional[tuple[int, int]] = (10, 15)
    profile_phase: Literal["head", "finetune"] = "finetune"
    profile_all_workers: bool = False
    # Progress: a live bar on a terminal; elsewhere (log files, Ray) a line at most every progress_every_s.
    progress_bar: bool = True
    progress_every_s: float = Field(30.0, ge=0)
    # Everything TensorFlow and Ray print (native start-up lines, every Ray worker's output) on the console.
    verbose: bool = False
    # Validation accuracies whose first crossing is recorded as time-to-accuracy.
    accuracy_thresholds: list[float] = [0.5, 0.8, 0.85, 0.9, 0.95]
    # Validate (and checkpoint) this often within a phase, and always at its end.
    eval_every_epochs: float = Field(1.0, gt=0)

    @field_validator("profile_steps")
    @classmethod
    def _profile_steps(cls, value):
        if value is not None and not (0 <= value[0] < value[1]):
            raise ValueError("must be [start, stop] with 0 <= start < stop, or null")
        return value


class RayConfig(_Section):
    """Ray Train settings, used when `enabled`; docs/ray.md explains the layouts."""

    enabled: bool = False
    address: Optional[str] = None  # None: RAY_ADDRESS if set (as under `ray job submit`), else an embedded local Ray
    # A number, or [min, max]: Ray Train starts as many workers as fit (at least min) and
    # restarts the group from the last checkpoint when more become available. The global batch
    # (train.batch_size) stays the same whatever the count; it must divide by every replica count.
    num_workers: Union[int, tuple[int, int]] = 2
    use_gpu: bool = False
    # Each worker mirrors over its own GPUs and all-reduces across workers, so 8 GPUs can be
    # 8 workers x 1, 2 x 4 or 1 x 8 (one worker is plain MirroredStrategy).
    gpus_per_worker: int = Field(1, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    # Custom resources each worker also needs, e.g. {"trainer": 1} to keep workers on one node type.
    resources_per_worker: dict[str, float] = {}
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Worker-group restarts (from the last checkpoint in the workdir) before the run fails; -1: no limit.
    max_failures: int = Field(2, ge=-1)
    # Ray Train's own run state (a few small files; no checkpoint goes there). None: <workdir>/ray
    storage_path: Optional[str] = None
    name: str = "mobilenet-transfer"
    # A worker silent this long (stopped, hung in a collective, partitioned) ends the attempt,
    # and Ray restarts the group from the last checkpoint: TF's collective timeout and Ray
    # Train's report-barrier and health-check timeouts.
    hang_timeout_s: float = Field(600, gt=0)
    # With use_gpu on a running cluster: how long to wait for the autoscaler to bring the GPUs
    # the run needs before giving up (exit 2). An embedded Ray has what it has: no wait.
    gpu_wait_s: float = Field(600, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, values):
        if isinstance(values, dict) and "keep_checkpoints" in values:
            raise ValueError("ray.keep_checkpoints is no longer a setting: each checkpoint is stored once, in "
                             "<workdir>/checkpoints, and checkpoint.keep says how many are kept; remove it")
        return values

    @field_validator("num_workers")
    @classmethod
    def _num_workers(cls, value):
        low, high = (value, value) if isinstance(value, int) else value
        if not 1 <= low <= high:
            raise ValueError("must be a number >= 1 or [min, max] with 1 <= min <= max")
        return value

    def worker_counts(self) -> range:
        """Every number of workers this run may have."""
        low, high = (self.num_workers, self.num_workers) if isinstance(self.num_workers, int) else self.num_workers
        return range(low, high + 1)

    @property
    def replicas_per_worker(self) -> int:
        return self.gpus_per_worker if self.use_gpu else 1

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources(cls, value: dict) -> dict:
        clash = {"CPU", "GPU"} & set(value)
        if clash:
            raise ValueError(f"{sorted(clash)} are set by cpus_per_worker / gpus_per_worker")
        return value

    @model_validator(mode="after")
    def _gpus(self):
        if self.use_gpu and self.gpus_per_worker < 1:
            raise ValueError("use_gpu=true needs gpus_per_worker >= 1")
        return self


class ExportConfig(_Section):
    """What `export` writes besides model.keras and the SavedModel (job.litert), and whether `train` exports."""

    # `train` exports its final checkpoint when it finishes. false: it stops at the checkpoint and
    # `python -m job export CONFIG` writes the export later (a search's trials, a small driver node).
    after_train: bool = True
    # LiteRT files for phones and edge devices, export/model_<kind>.tflite: float16 weights, or
    # full-integer int8 (post-training). `python -m job export CONFIG --litert float16,int8` sets it.
    litert: list[Literal["float16", "int8"]] = []
    # Images of data.train_split (its first ones) the int8 calibration runs: their activation
    # ranges set the int8 scales. A few hundred is what TensorFlow's guide suggests.
    representative_images: int = Field(256, ge=1, le=50_000)
    # The int8 file is not full-integer by default: full-integer post-training int8 lost 1.6-2.6
    # points on the quick recipe, over the 1-point goal; these keep the ops it lost most on in
    # float32 (measured, docs/stack.md). Full-integer: int8_preprocessing=int8 and
    # int8_float_layers=[].
    # "float": the upscaling and sharpening stay float32 (about half the full-integer loss);
    # "int8": they are integer too.
    int8_preprocessing: Literal["int8", "float"] = "float"
    # Backbone layers (Keras layer names) that stay float32 in the int8 file: MobileNetV2's
    # first convolutions, where int8 erred most (per-layer error of TensorFlow's quantization
    # debugger); their weights are a few thousand, so the file barely grows.
    int8_float_layers: list[str] = ["Conv1", "expanded_conv_depthwise", "block_2_depthwise", "expanded_conv_project"]
    # After writing them: each file's accuracy on data.eval_split next to the SavedModel's, and
    # its median latency per image (batch 1) over latency_runs calls on this machine's CPU.
    measure: bool = True
    latency_runs: int = Field(50, ge=1)
    # LiteRT interpreter threads (accuracy and latency); 1 is what a phone app usually gives it.
    threads: int = Field(1, ge=1)


class StorageConfig(_Section):
    # How long a workdir's object store may stop answering (timeouts, 5xx, throttling) before
    # the run ends (exit 75, naming the last checkpoint safe in it): uploads are retried with
    # backoff meanwhile, in the background, while training goes on (job.uploads).
    outage_timeout_s: float = Field(600, gt=0)


class Config(_Section):
    workdir: str = "runs/default"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    export: ExportConfig = ExportConfig()

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.train.cache_features is True and self.augment_for("head") != "none":
            raise ValueError(
                "train.cache_features=true needs train.head.augment='none' (cached features cannot be augmented)"
            )
        if self.train.finetune.cache_frozen and self.train.finetune.unfreeze == "all":
            raise ValueError("train.finetune.cache_frozen=true needs train.finetune.unfreeze=N (a frozen bottom to cache)")
        if self.train.finetune.cache_frozen and self.augment_for("finetune") not in ("none", "flip", "auto"):
            raise ValueError("train.finetune.cache_frozen=true needs the finetune augmentation 'none' or 'flip' "
                             "(crops cannot be cached)")
        if self.ray.enabled and len(self.ray.worker_counts()) > 1 and self.train.per_replica_batch_size:
            raise ValueError(f"ray.num_workers={list(self.ray.num_workers)} changes the number of replicas: set the "
                             "global batch (train.batch_size) and leave train.per_replica_batch_size unset")
        return self

    def augment_for(self, phase: str) -> str:
        return getattr(self.train, phase).augment or self.data.augment


def _set_dotted(tree: dict, dotted: str, value) -> None:
    node = tree
    keys = dotted.split(".")
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def parse_override(text: str) -> tuple[str, object]:
    """`train.batch_size=128` -> ("train.batch_size", 128); values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}': expected key=value, e.g. train.batch_size=128")
    try:
        return key.strip(), yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err.problem})") from None


_UNION_TYPES = {"bool", "int", "float", "str"}


def _setting(error: dict) -> str:
    """Dotted setting name, without pydantic's union-member tags such as `literal['auto']`."""
    parts = [str(p) for p in error["loc"] if str(p) not in _UNION_TYPES and "[" not in str(p)]
    return ".".join(parts) or "config"


def _describe(errors: list[dict]) -> str:
    first = errors[0]
    where = _setting(first)
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown setting"
    # A value that fits no member of a union fails once per member: say all that is allowed.
    messages = [e["msg"].removeprefix("Value error, ") for e in errors if _setting(e) == where]
    message = "; or ".join(dict.fromkeys(messages))
    if where == "config" or message.startswith(f"{where}."):  # a check that names its settings itself
        return message
    bad = first.get("input")
    if isinstance(bad, (dict, list)) and first["type"] != "literal_error":
        return f"{where}: {message}"
    return f"{where}={bad!r}: {message}"


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None) and apply overrides."""
    tree: dict = {}
    if path is not None:
        config_path = Path(path)
        if not config_path.is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            tree = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path!r}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path!r}: top level must be a mapping of settings")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        # Onto the defaults, so `train.head.augment=none` keeps the head's other defaults.
        return Config.model_validate(_merge(Config().model_dump(), tree))
    except ValidationError as err:
        raise ConfigError(_describe(err.errors())) from None


def with_settings(config: Config, settings: dict) -> Config:
    """`config` with dotted settings replaced (`{"train.head.epochs": 2}`, values as YAML gives
    them), validated again: ConfigError with the same one line as an override otherwise."""
    tree = config.model_dump(mode="json")
    for key, value in settings.items():
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err.errors())) from None


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

