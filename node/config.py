"""TOML configuration of the director and the envoys, validated in one pass.

Every config is decoded into frozen msgspec Structs that forbid unknown fields, so a typo is an
error rather than a silently ignored setting. Any error names the file and the field (msgspec's
path, e.g. ``$.deadlines.share_keys``). Relative paths inside a config are relative to the
config file's folder, so a kit of configs and keys can be moved as a whole.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec

from broker.files import read_toml
from node.entrypoints import ENTRY_POINT_PATTERN
from node.strategy import StrategyConfig
from node.training.device import DEVICE_SPEC_PATTERN
from node.ui.config import UiConfig
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.configfile import convert_config
from protocol.messages import DEFAULT_UPDATE_NORM, ProxMu
from protocol.secagg.policy import DEFAULT_CORRUPT_FRACTION, DEFAULT_DROPOUT_FRACTION, ClientPolicy
from protocol.types import NodeId

PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
Fraction = Annotated[float, msgspec.Meta(gt=0, le=1)]
Url = Annotated[str, msgspec.Meta(pattern=r"^(zmq\+tcp|mqtt|mqtts)://.+$")]
PathStr = Annotated[str, msgspec.Meta(min_length=1)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]  # numpy seeds are non-negative
# "package.module:name": a team's own factory, loader or trainer (node.entrypoints).
EntryPoint = Annotated[str, msgspec.Meta(pattern=ENTRY_POINT_PATTERN)]
# Keyword arguments handed to a team's own code as written (no path resolution, any TOML).
Options = dict[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], Any]
# What the bundled models are made by; a [model] without `factory` means this one.
BUNDLED_FACTORY = "node.training.model:build_model"
# Fields that configure the bundled model / data sources, void with a team's own factory /
# loader (setting them then is an error: they would be ignored).
BUNDLED_MODEL_FIELDS = ("arch", "defense", "width", "norm", "dropout")
BUNDLED_DATA_FIELDS = ("source", "image_size", "val_fraction")


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Credentials(_Section, frozen=True, kw_only=True):
    """Files holding this node's bus credentials (paths relative to the config file)."""

    # CurveZMQ (zmq+tcp://): z85 key files as written by `fedbus provision` / the demo.
    curve_secret_key: PathStr | None = None
    curve_public_key: PathStr | None = None
    broker_public_key: PathStr | None = None
    # MQTT: username + password file, optional TLS files.
    username: str | None = None
    password_file: PathStr | None = None
    tls_ca: PathStr | None = None
    tls_cert: PathStr | None = None
    tls_key: PathStr | None = None


# The image sizes the models accept (node.training.model.build_model checks these very
# bounds), so a size that passes validation never fails at run time.
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 256
ImageSize = Annotated[int, msgspec.Meta(ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)]


class Partition(_Section, frozen=True, kw_only=True):
    """This envoy's share of a data source that several envoys hold a copy of (a simulated
    federation): part `index` of `count`. `folder` says "the whole folder is this hospital's
    own", the same as leaving [data.partition] out."""

    scheme: Literal["dirichlet", "iid", "folder"] = "dirichlet"
    alpha: PosFloat = 0.5
    index: Annotated[int, msgspec.Meta(ge=0)] = 0
    count: PosInt = 1
    seed: Seed = 0

    def __post_init__(self) -> None:
        if self.scheme == "folder":
            return
        if self.count < 2:
            raise ValueError(
                f"partition: scheme {self.scheme!r} splits data among count >= 2 envoys "
                f"(count = {self.count}); to train on all of it, leave [data.partition] out"
            )
        if self.index >= self.count:
            raise ValueError(
                f"partition: index {self.index} is not one of the {self.count} parts "
                f"(0..{self.count - 1})"
            )


class DataSource(_Section, frozen=True, kw_only=True):
    # A team's own loader, "package.module:function": called as loader(path, **options)
    # (just loader(**options) without a path), it returns this envoy's (train, val) torch
    # datasets (docs/bring-your-own.md). Unset: the bundled `source` below.
    loader: EntryPoint | None = None
    options: Options = {}
    source: Literal["pneumoniamnist", "image_folder"] = "pneumoniamnist"
    path: PathStr | None = None
    image_size: ImageSize = 28
    # Fraction of this envoy's training part held out as its validation split (image folders
    # have none of their own; PneumoniaMNIST's official val split is partitioned instead).
    val_fraction: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.1
    # Use at most this many samples of each split (small test federations); 0 = all.
    limit: Annotated[int, msgspec.Meta(ge=0)] = 0
    # None (no [data.partition] table): the envoy trains on all of its data, as a hospital
    # does on its own images.
    partition: Partition | None = None

    def __post_init__(self) -> None:
        if self.loader is None:
            if (
                self.source == "pneumoniamnist"
                and self.partition
                and self.partition.scheme == "folder"
            ):
                raise ValueError(
                    'partition: scheme "folder" means a hospital\'s own image folder, and '
                    "PneumoniaMNIST is one shared file: split it with dirichlet or iid (index, "
                    "count), or leave [data.partition] out to train on all of it"
                )
            if self.path is None:
                raise ValueError(
                    f"data.path is required for source {self.source!r} (or name your own "
                    f"data.loader)"
                )
            if self.options:
                raise ValueError(
                    "data.options are the keyword arguments of a custom data.loader; "
                    "without one they have no use"
                )
        else:
            _only_bundled(self, "data", "loader", BUNDLED_DATA_FIELDS)


def _only_bundled(section: msgspec.Struct, name: str, hook: str, fields: tuple[str, ...]) -> None:
    """Fields that configure the bundled implementation must keep their defaults when the
    section names the team's own code instead: a setting that would be ignored is an error."""
    defaults = {f.name: f.default for f in msgspec.structs.fields(section)}
    changed = [f for f in fields if getattr(section, f) != defaults[f]]
    if changed:
        listed = ", ".join(f"{name}.{f}" for f in changed)
        verb = "configures" if len(changed) == 1 else "configure"
        raise ValueError(
            f"{listed} {verb} the bundled implementation, which {name}.{hook} = "
            f"{getattr(section, hook)!r} replaces: remove {'it' if len(changed) == 1 else 'them'}"
            f" (your own code's settings go into [{name}.options])"
        )


class ModelConfig(_Section, frozen=True, kw_only=True):
    # A team's own network, "package.module:function": called with keyword arguments
    # num_classes, in_channels, image_size and everything in [model.options], it returns a
    # torch.nn.Module (docs/bring-your-own.md). Unset: the bundled CNN / ResNet-18, which
    # `arch`, `defense`, `width`, `norm` and `dropout` configure.
    factory: EntryPoint | None = None
    options: Options = {}
    arch: Literal["cnn", "resnet18"] = "cnn"
    defense: Literal["cvb", "precode", "none"] = "cvb"
    width: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 32
    norm: Literal["group", "batch", "none"] | None = None
    dropout: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.0
    # The model's input and output, whoever builds it: images in_channels x image_size x
    # image_size in [0, 1], logits over num_classes (named by `classes`, in label order).
    # The bundled models take MIN_IMAGE_SIZE..MAX_IMAGE_SIZE; a team's own, up to 4096.
    image_size: Annotated[int, msgspec.Meta(ge=8, le=4096)] = 28
    in_channels: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    num_classes: Annotated[int, msgspec.Meta(ge=2, le=1000)] = 2
    classes: list[Annotated[str, msgspec.Meta(min_length=1, max_length=64)]] | None = None
    init_seed: Seed = 0

    def __post_init__(self) -> None:
        if self.classes is not None:
            if len(self.classes) != self.num_classes:
                raise ValueError(
                    f"model.classes names {len(self.classes)} classes, model.num_classes is "
                    f"{self.num_classes}"
                )
            if len(set(self.classes)) != len(self.classes):
                raise ValueError(f"model.classes has a name twice: {self.classes}")
        if self.factory is None:
            if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
                raise ValueError(
                    f"model.image_size {self.image_size}: the bundled models take "
                    f"{MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels"
                )
            if self.options:
                raise ValueError(
                    "model.options are the keyword arguments of a custom model.factory; the "
                    "bundled models take model.arch, defense, width, norm and dropout"
                )
        else:
            _only_bundled(self, "model", "factory", BUNDLED_MODEL_FIELDS)

    @property
    def factory_name(self) -> str:
        """The factory that builds this model ("package.module:name")."""
        return self.factory or BUNDLED_FACTORY


def model_kwargs(m: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of the model's factory for a [model] section.

    The bundled factory (node.training.model.build_model) takes the bundled fields; a team's
    own factory takes num_classes, in_channels, image_size and [model.options].
    """
    if m.factory is not None:
        return {
            **m.options,
            "num_classes": m.num_classes,
            "in_channels": m.in_channels,
            "image_size": m.image_size,
        }
    kw: dict[str, Any] = {
        "arch": m.arch,
        "defense": m.defense,
        "image_size": m.image_size,
        "num_classes": m.num_classes,
        "width": m.width,
        "dropout": m.dropout,
    }
    if m.in_channels != 1:
        kw["in_channels"] = m.in_channels
    if m.norm:
        kw["norm"] = m.norm
    return kw


UnitFraction = Annotated[float, msgspec.Meta(ge=0, lt=1)]


class PolicyConfig(_Section, frozen=True, kw_only=True):
    """The envoy's own security policy (its [policy] section): what it accepts from the
    director, whatever RoundStart says. Secure by default; every way to weaken it is named
    insecure_*. See the README's "Threat model" and protocol.secagg.policy.
    """

    # At most this fraction of a round's participants colludes with the director; the envoy
    # recomputes the least threshold it accepts for the announced n from it.
    corrupt_fraction: UnitFraction = DEFAULT_CORRUPT_FRACTION
    # At most this fraction drops out: the SecAgg+ graph must stay connected without them,
    # and this envoy masks with at least (1 - dropout_fraction) k of its k neighbours.
    dropout_fraction: UnitFraction = DEFAULT_DROPOUT_FRACTION
    # The largest L2 norm bound of an update this envoy accepts from RoundStart.
    max_update_norm: PosFloat = DEFAULT_UPDATE_NORM
    # The most local epochs a round may ask of this hospital's hardware: RoundStart's plan is
    # the director's choice, and an envoy that trained 1000 epochs would be tied up for days.
    max_local_epochs: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    # The largest FedProx coefficient a round may ask for: a large mu pins local training to
    # the global model (this hospital's data would barely count), and lr * mu > 2 diverges.
    max_prox_mu: ProxMu = 1.0
    # Send updates and validation histograms in the clear when the director asks for it.
    insecure_plain_updates: bool = False
    # Seed training, augmentation and the bottleneck's noise from `seed` and the round
    # instead of the OS CSPRNG, so runs replay exactly. A director that knows the seed can
    # regenerate the bottleneck's noise and invert the update: refused unless the bus is on
    # this machine (a loopback address), i.e. a test or demo, never a deployment.
    insecure_reproducible_seeds: bool = False

    def client_policy(self) -> ClientPolicy:
        return ClientPolicy(
            corrupt_fraction=self.corrupt_fraction, dropout_fraction=self.dropout_fraction
        )


def is_loopback_url(url: str) -> bool:
    """Whether a bus URL points at this machine (127.0.0.0/8, ::1 or localhost)."""
    host = urlsplit(url.replace("zmq+tcp://", "tcp://", 1)).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


ReservedFree = Annotated[
    str,
    msgspec.Meta(
        min_length=1, max_length=64, pattern=r"^(?!broadcast$)[A-Za-z0-9][A-Za-z0-9_.-]*$"
    ),
]


class PrivacySettings(_Section, frozen=True, kw_only=True):
    """Record-level differential privacy of this envoy's training (DP-SGD with a privacy
    accountant, node.training.privacy): each round's update is (epsilon, delta)-DP with
    respect to any one of this envoy's training records, epsilon composed over the rounds.

    `noise_multiplier` is sigma (noise std over the clip norm `max_grad_norm`);
    `sample_rate` the Poisson sampling rate (unset: batch_size over the record count);
    `class_weights` public per-class loss weights (unset: all 1: the usual balanced weights
    come from the envoy's own label counts, a statistic of the records). `max_epsilon`:
    the envoy refuses to train a round that would spend beyond it. `sample_weight` is the
    FedAvg weight the envoy reports instead of its record count (a statistic of the
    records, which the add/remove-one guarantee does not cover): a public number, such as
    a size the hospital agrees to publish; unset, every DP envoy weighs 1.
    `physical_batch` caps the records whose per-record gradients are held at once (memory
    only: a larger Poisson batch is processed in pieces and stepped once).

    `mode = "distributed"` weakens what protects one envoy's update on its own: each envoy
    adds only a 1/honest_envoys share of the noise variance, so the guarantee holds for the
    secure aggregate of at least `honest_envoys` honest envoys (SecAgg), not for an update
    seen in the clear (node.training.privacy states the trust assumption); it is therefore
    only accepted with `honest_envoys` given explicitly.
    """

    noise_multiplier: PosFloat
    max_grad_norm: PosFloat = 1.0
    sample_rate: Fraction | None = None
    delta: Annotated[float, msgspec.Meta(gt=0, le=1e-3)] = 1e-5
    accountant: Literal["rdp", "prv"] = "rdp"
    mode: Literal["local", "distributed"] = "local"
    honest_envoys: PosInt | None = None
    class_weights: list[PosFloat] | None = None
    max_epsilon: PosFloat | None = None
    sample_weight: PosInt = 1
    physical_batch: PosInt = 256

    def __post_init__(self) -> None:
        if self.mode == "distributed" and self.honest_envoys is None:
            raise ValueError(
                "mode 'distributed' needs honest_envoys: the number of honest envoys whose "
                "secure aggregate carries the full noise"
            )
        if self.mode == "local" and self.honest_envoys not in (None, 1):
            raise ValueError("honest_envoys only applies to mode 'distributed'")


class EnvoyTraining(_Section, frozen=True, kw_only=True):
    """How this envoy trains and evaluates (the director's [train] says what, per round)."""

    # "auto" takes the first CUDA GPU, else Apple's MPS, else the CPU; an accelerator asked
    # for by name that the machine lacks is an error (node.training.device).
    device: Annotated[str, msgspec.Meta(pattern=DEVICE_SPEC_PATTERN)] = "auto"
    # A team's own trainer class, "package.module:Class", built as Class(context) and used
    # through the Trainer protocol (node.trainer). Unset: the bundled TorchTrainer.
    trainer: EntryPoint | None = None
    options: Options = {}
    # Worker processes that read a streamed data set (a [data] loader's) ahead of training.
    workers: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    # Record-level differential privacy (DP-SGD); unset: ordinary training.
    privacy: PrivacySettings | None = None

    def __post_init__(self) -> None:
        if self.privacy is not None and self.trainer is not None:
            raise ValueError(
                "privacy is implemented by the bundled trainer; a custom train.trainer "
                "must make its own training private (drop [train.privacy])"
            )


class EnvoyConfig(_Section, frozen=True, kw_only=True):
    node_id: ReservedFree
    federation: NodeId
    bus_url: Url
    state_dir: PathStr
    data: DataSource
    # Must match the director's [model]: the envoy rebuilds the same network locally.
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    train: EnvoyTraining = msgspec.field(default_factory=EnvoyTraining)
    credentials: Credentials = msgspec.field(default_factory=Credentials)
    signing_key: PathStr | None = None  # Ed25519 private key (raw 32 bytes, hex file)
    director_signing_key: PathStr | None = None  # the director's Ed25519 public key
    # Public signing keys of the other envoys (node id -> file): the malicious-director SecAgg
    # mode needs them to check each other's signed key advertisements.
    peer_signing_keys: dict[NodeId, PathStr] = msgspec.field(default_factory=dict)
    director_id: NodeId = "director"
    heartbeat_s: PosFloat = 2.0
    # Only read under [policy] insecure_reproducible_seeds: every secret the director must
    # not predict otherwise comes from the OS CSPRNG, fresh each round.
    seed: Seed = 0
    threads: PosInt = 1
    audit: bool = False
    faults: PathStr | None = None
    insecure_no_auth: bool = False
    max_frame_bytes: PosInt = DEFAULT_MAX_FRAME_BYTES
    policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig)

    def __post_init__(self) -> None:
        # "Production" = the bus is not on this machine: no fixed seeds there.
        if self.policy.insecure_reproducible_seeds and not is_loopback_url(self.bus_url):
            raise ValueError(
                "policy.insecure_reproducible_seeds: refused with the bus at "
                f"{self.bus_url} (fixed seeds let the director regenerate the bottleneck's "
                "noise); only a bus on a loopback address (tests, demos) may use them"
            )
        bundled = self.model.factory is None
        if self.train.privacy is not None and bundled and self.model.norm in (None, "batch"):
            raise ValueError(
                "train.privacy needs model.norm 'group' or 'none' (here and in the "
                "director's [model]): batch norm mixes the records of a batch and its "
                "running statistics leave the envoy without noise"
            )


class Deadlines(_Section, frozen=True, kw_only=True):
    """Seconds each stage may take; a participant that misses one is a dropout."""

    training: PosFloat = 300.0
    advertise_keys: PosFloat = 30.0
    share_keys: PosFloat = 30.0
    masked_input: PosFloat = 300.0
    consistency: PosFloat = 30.0
    unmask: PosFloat = 30.0
    evaluate: PosFloat = 120.0


class RetryConfig(_Section, frozen=True, kw_only=True):
    """When a stage's requests go again to participants that have not answered (node.retransmit):
    after first_s without any answer, then each wait doubles while the silence lasts, up to
    max_s (and up to a quarter of the stage's deadline); every answer resets it to first_s."""

    first_s: PosFloat = 2.0
    max_s: PosFloat = 30.0

    def __post_init__(self) -> None:
        if self.first_s > self.max_s:
            raise ValueError(f"first_s ({self.first_s}) is above max_s ({self.max_s})")


class TrainDefaults(_Section, frozen=True, kw_only=True):
    local_epochs: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 2
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 32
    lr: Annotated[float, msgspec.Meta(gt=0, le=10)] = 0.05
    momentum: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, msgspec.Meta(ge=0, le=1)] = 5e-4
    kl_beta: NonNegFloat = 1e-3
    augment: bool = True
    # FedProx (Li et al. 2020): each envoy adds mu/2 ||w - w_global||^2 to its local loss;
    # 0 = plain local training. Envoys refuse mu above their [policy] max_prox_mu, and an
    # envoy training with differential privacy refuses any mu > 0.
    prox_mu: ProxMu = 0.0


class LrSchedule(_Section, frozen=True, kw_only=True):
    kind: Literal["constant", "cosine", "step"] = "cosine"
    min_lr: NonNegFloat = 0.0
    warmup_rounds: Annotated[int, msgspec.Meta(ge=0)] = 0
    step_every: PosInt = 10
    step_gamma: Fraction = 0.5


class SecAggConfig(_Section, frozen=True, kw_only=True):
    graph: Literal["auto", "complete", "harary"] = "auto"
    # Fractions the (k, t) finder must tolerate (the envoys check them against their own
    # [policy]: a director assuming fewer colluding envoys than they do is refused).
    dropout_fraction: UnitFraction = DEFAULT_DROPOUT_FRACTION
    corrupt_fraction: UnitFraction = DEFAULT_CORRUPT_FRACTION
    # The malicious-director variant; envoys refuse any other (kept so configs say it).
    malicious: bool = True
    # Every coordinate of an envoy's weighted update is clipped to [-clip, clip] before
    # quantisation into Z_2^32.
    clip: PosFloat = 1.0
    # Every envoy clips its update to this L2 norm before masking (announced in RoundStart,
    # at most the envoys' [policy] max_update_norm); an aggregate whose mean is longer is
    # refused.
    update_norm: PosFloat = DEFAULT_UPDATE_NORM

    def __post_init__(self) -> None:
        if not self.malicious:
            raise ValueError(
                "secagg.malicious = false: envoys pin the malicious-director mode on and "
                "refuse semi-honest rounds"
            )


# The threshold rules of node.training.operating_point.METHODS (a test keeps them equal).
OperatingPointMethod = Literal["youden", "sensitivity", "binormal", "smoothed"]


class EvalConfig(_Section, frozen=True, kw_only=True):
    bins: Annotated[int, msgspec.Meta(ge=2, le=10000)] = 100
    # How the decision threshold is chosen from the summed validation histograms (two
    # classes): "youden" max J; "binormal" max J on a binormal fit of the class logits (the
    # smoothed ROC chosen by leave-one-envoy-out validation, benchmarks/accuracy);
    # "smoothed" max J on kernel-smoothed class CDFs; "sensitivity" the highest threshold
    # whose validation sensitivity is still >= target_sensitivity.
    operating_point: OperatingPointMethod = "youden"
    target_sensitivity: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.95


class TrackingConfig(_Section, frozen=True, kw_only=True):
    # A folder for TensorBoard event files, written from every completed round's record
    # (`tensorboard --logdir` it); relative to the config file.
    tensorboard: PathStr | None = None


class DirectorConfig(_Section, frozen=True, kw_only=True):
    federation: NodeId
    bus_url: Url
    state_dir: PathStr
    rounds: Annotated[int, msgspec.Meta(ge=1, le=100000)]
    node_id: NodeId = "director"
    credentials: Credentials = msgspec.field(default_factory=Credentials)
    signing_key: PathStr | None = None
    # Envoy node id -> Ed25519 public key file. When set, only these envoys may take part and
    # every frame from them must carry a valid signature.
    envoy_signing_keys: dict[NodeId, PathStr] = msgspec.field(default_factory=dict)
    min_envoys: PosInt = 2
    target_envoys: PosInt = 100
    participation: Fraction = 1.0
    # Before round 1: how long to wait for target_envoys once min_envoys are online.
    wait_for_envoys_s: PosFloat = 120.0
    # Before any round: how long fewer than min_envoys may be online before the director gives
    # up (exit code QUORUM_LOST, the reason in status.json) instead of waiting forever.
    quorum_timeout_s: PosFloat = 600.0
    # A round aborted (too few survivors) is retried this many times before giving up.
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=64)] = 3
    heartbeat_timeout_s: PosFloat = 10.0
    deadlines: Deadlines = msgspec.field(default_factory=Deadlines)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    train: TrainDefaults = msgspec.field(default_factory=TrainDefaults)
    lr_schedule: LrSchedule = msgspec.field(default_factory=LrSchedule)
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    secagg: SecAggConfig = msgspec.field(default_factory=SecAggConfig)
    # How the round's mean update moves the global model (node.strategy): fedavg (default),
    # fedavgm, fedadam or fedyogi; their state is checkpointed with the weights.
    strategy: StrategyConfig = msgspec.field(default_factory=StrategyConfig)
    # The only way to send plain (unmasked) updates: the director then sees each envoy's update.
    insecure_plain_aggregation: bool = False
    eval: EvalConfig = msgspec.field(default_factory=EvalConfig)
    tracking: TrackingConfig = msgspec.field(default_factory=TrackingConfig)
    # The read-only operator page (node.ui); unset: not served.
    ui: UiConfig | None = None
    seed: Seed = 0
    audit: bool = False
    insecure_no_auth: bool = False
    max_frame_bytes: PosInt = DEFAULT_MAX_FRAME_BYTES
    # Frames waiting for the round driver: at most this many per envoy, and in all at most
    # this many times the envoys it may select (more are dropped, counted and logged), so a
    # flooding envoy costs bounded memory and cannot crowd the others out.
    inbox_per_sender: PosInt = 16

    def __post_init__(self) -> None:
        if self.target_envoys < self.min_envoys:
            raise ValueError(
                f"target_envoys ({self.target_envoys}) is below min_envoys ({self.min_envoys})"
            )


T = TypeVar("T", bound=msgspec.Struct)

# Fields holding paths, resolved against the config file's folder.
_PATH_FIELDS = {
    "state_dir",
    "signing_key",
    "director_signing_key",
    "faults",
    "path",
    "curve_secret_key",
    "curve_public_key",
    "broker_public_key",
    "password_file",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "tensorboard",
}
_PATH_MAPS = {"envoy_signing_keys", "peer_signing_keys"}


def _resolve_paths(data: Any, base: Path) -> Any:
    if not isinstance(data, Mapping):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "options":
            out[key] = value  # the team's own keyword arguments, passed on as written
        elif key in _PATH_FIELDS and isinstance(value, str) and value:
            out[key] = str((base / value).resolve()) if not Path(value).is_absolute() else value
        elif key in _PATH_MAPS and isinstance(value, Mapping):
            out[key] = {
                k: str((base / v).resolve()) if isinstance(v, str) and v else v
                for k, v in value.items()
            }
        else:
            out[key] = _resolve_paths(value, base)
    return out


def parse_config(data: Mapping[str, Any], kind: type[T], *, source: str, base: Path) -> T:
    """Validate a decoded TOML table as `kind`, paths resolved against `base`; ConfigError
    names `source` and the field."""
    return convert_config(_resolve_paths(data, base), kind, source=source)


def _load(path: str | Path, kind: type[T]) -> T:
    path = Path(path)
    return parse_config(read_toml(path), kind, source=str(path), base=path.resolve().parent)


def load_envoy_config(path: str | Path) -> EnvoyConfig:
    return _load(path, EnvoyConfig)


def load_director_config(path: str | Path) -> DirectorConfig:
    return _load(path, DirectorConfig)
