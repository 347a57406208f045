"""TOML configuration of the director and the envoys, validated in one pass.

Every config is decoded into frozen msgspec Structs that forbid unknown fields, so a typo is an
error rather than a silently ignored setting. Any error names the file and the field (msgspec's
path, e.g. ``$.deadlines.share_keys``). Relative paths inside a config are relative to the
config file's folder, so a kit of configs and keys can be moved as a whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from broker.files import read_toml
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.configfile import convert_config
from protocol.types import NodeId

PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
Fraction = Annotated[float, msgspec.Meta(gt=0, le=1)]
Url = Annotated[str, msgspec.Meta(pattern=r"^(zmq\+tcp|mqtt|mqtts)://.+$")]
PathStr = Annotated[str, msgspec.Meta(min_length=1)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]  # numpy seeds are non-negative


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


class Partition(_Section, frozen=True, kw_only=True):
    scheme: Literal["dirichlet", "iid", "folder"] = "dirichlet"
    alpha: PosFloat = 0.5
    index: Annotated[int, msgspec.Meta(ge=0)] = 0
    count: PosInt = 1
    seed: Seed = 0


class DataSource(_Section, frozen=True, kw_only=True):
    source: Literal["pneumoniamnist", "image_folder"] = "pneumoniamnist"
    path: PathStr
    image_size: Annotated[int, msgspec.Meta(ge=8, le=512)] = 28
    # Fraction of this envoy's training part held out as its validation split (image folders
    # have none of their own; PneumoniaMNIST's official val split is partitioned instead).
    val_fraction: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.1
    # Use at most this many samples of each split (small test federations); 0 = all.
    limit: Annotated[int, msgspec.Meta(ge=0)] = 0
    partition: Partition = msgspec.field(default_factory=Partition)


class ModelConfig(_Section, frozen=True, kw_only=True):
    arch: Literal["cnn", "resnet18"] = "cnn"
    defense: Literal["cvb", "precode", "none"] = "cvb"
    image_size: Annotated[int, msgspec.Meta(ge=8, le=512)] = 28
    num_classes: Annotated[int, msgspec.Meta(ge=2, le=1000)] = 2
    width: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 32
    norm: Literal["group", "batch", "none"] | None = None
    dropout: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.0
    init_seed: Seed = 0


def model_kwargs(m: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of node.training.model.build_model for a [model] section."""
    kw: dict[str, Any] = {
        "arch": m.arch,
        "defense": m.defense,
        "image_size": m.image_size,
        "num_classes": m.num_classes,
        "width": m.width,
        "dropout": m.dropout,
    }
    if m.norm:
        kw["norm"] = m.norm
    return kw


ReservedFree = Annotated[
    str,
    msgspec.Meta(
        min_length=1, max_length=64, pattern=r"^(?!broadcast$)[A-Za-z0-9][A-Za-z0-9_.-]*$"
    ),
]


class EnvoyConfig(_Section, frozen=True, kw_only=True):
    node_id: ReservedFree
    federation: NodeId
    bus_url: Url
    state_dir: PathStr
    data: DataSource
    # Must match the director's [model]: the envoy rebuilds the same network locally.
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    credentials: Credentials = msgspec.field(default_factory=Credentials)
    signing_key: PathStr | None = None  # Ed25519 private key (raw 32 bytes, hex file)
    director_signing_key: PathStr | None = None  # the director's Ed25519 public key
    # Public signing keys of the other envoys (node id -> file): the malicious-director SecAgg
    # mode needs them to check each other's signed key advertisements.
    peer_signing_keys: dict[NodeId, PathStr] = msgspec.field(default_factory=dict)
    director_id: NodeId = "director"
    heartbeat_s: PosFloat = 2.0
    seed: Seed = 0
    threads: PosInt = 1
    audit: bool = False
    faults: PathStr | None = None
    insecure_no_auth: bool = False
    max_frame_bytes: PosInt = DEFAULT_MAX_FRAME_BYTES


class Deadlines(_Section, frozen=True, kw_only=True):
    """Seconds each stage may take; a participant that misses one is a dropout."""

    training: PosFloat = 300.0
    advertise_keys: PosFloat = 30.0
    share_keys: PosFloat = 30.0
    masked_input: PosFloat = 300.0
    consistency: PosFloat = 30.0
    unmask: PosFloat = 30.0
    evaluate: PosFloat = 120.0


class TrainDefaults(_Section, frozen=True, kw_only=True):
    local_epochs: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 2
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 32
    lr: Annotated[float, msgspec.Meta(gt=0, le=10)] = 0.05
    momentum: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, msgspec.Meta(ge=0, le=1)] = 5e-4
    kl_beta: NonNegFloat = 1e-3
    augment: bool = True


class LrSchedule(_Section, frozen=True, kw_only=True):
    kind: Literal["constant", "cosine", "step"] = "cosine"
    min_lr: NonNegFloat = 0.0
    warmup_rounds: Annotated[int, msgspec.Meta(ge=0)] = 0
    step_every: PosInt = 10
    step_gamma: Fraction = 0.5


class SecAggConfig(_Section, frozen=True, kw_only=True):
    graph: Literal["auto", "complete", "harary"] = "auto"
    # Fractions the (k, t) finder must tolerate.
    dropout_fraction: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.34
    corrupt_fraction: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.0
    malicious: bool = True
    # Every coordinate of an envoy's weighted update is clipped to [-clip, clip] before
    # quantisation into Z_2^32.
    clip: PosFloat = 1.0


class EvalConfig(_Section, frozen=True, kw_only=True):
    bins: Annotated[int, msgspec.Meta(ge=2, le=10000)] = 100


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
    train: TrainDefaults = msgspec.field(default_factory=TrainDefaults)
    lr_schedule: LrSchedule = msgspec.field(default_factory=LrSchedule)
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    secagg: SecAggConfig = msgspec.field(default_factory=SecAggConfig)
    # The only way to send plain (unmasked) updates: the director then sees each envoy's update.
    insecure_plain_aggregation: bool = False
    eval: EvalConfig = msgspec.field(default_factory=EvalConfig)
    seed: Seed = 0
    audit: bool = False
    insecure_no_auth: bool = False
    max_frame_bytes: PosInt = DEFAULT_MAX_FRAME_BYTES

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
}
_PATH_MAPS = {"envoy_signing_keys", "peer_signing_keys"}


def _resolve_paths(data: Any, base: Path) -> Any:
    if not isinstance(data, Mapping):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in _PATH_FIELDS and isinstance(value, str) and value:
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
