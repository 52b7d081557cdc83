"""`python -m engine fetch MODEL --to DIR`: download a model's published files from the Hugging Face
Hub into the layout `--weights DIR` reads (README "Weights").

huggingface_hub does the transfers (its resume after a dropped connection, progress bars, cache and
token: HF_TOKEN or `hf auth login`; HF_ENDPOINT points it at a mirror). Before anything is downloaded
the command lists the files and their total size; files already there at the hub's size are left to the
library, which skips them when they are complete. It ends by opening every file with the strict loaders
(engine.weights_check), so a broken download is reported now, not when the server starts. This is the
only code that downloads: the server and `engine render` read `--weights` and nothing else.
"""

from __future__ import annotations

import glob
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import httpx2
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

from engine.config import ModelConfig, load_model_config
from interface.catalogue import ConfigError, model_names

log = logging.getLogger("engine.fetch")

REVISION = "main"
TAEHV = "taehv"  # the light TAEHV encoder/decoder's file, fetched on its own
TAEHV_REPO = "lightx2v/Autoencoders"
TAEHV_FILE = "taew2_1.pth"
LIGHTVAE = "lightvae"  # LightVAE (the pruned Wan VAE), from the same repository
LIGHTVAE_FILE = "lightvaew2_1.pth"


class FetchError(Exception):
    """Why the fetch failed, in one line for the command line."""


@dataclass(frozen=True)
class Source:
    """Files of one hub repository: those matching `patterns` land under DIR/`subdir` at their repo paths."""

    repo: str
    patterns: tuple[str, ...]
    subdir: str = ""


@dataclass(frozen=True)
class Target:
    """What `fetch MODEL` downloads, and the strict check of the result (given DIR, returns the files)."""

    name: str
    sources: tuple[Source, ...]
    check: Callable[[Path], list[Path]]
    use: str  # how to use the result, for the last log line


@dataclass(frozen=True)
class RemoteFile:
    source: Source
    path: str  # in the repository
    size: int  # bytes, as the hub lists them
    local: Path

    @property
    def local_size(self) -> Optional[int]:
        return self.local.stat().st_size if self.local.is_file() else None


@dataclass(frozen=True)
class Plan:
    root: Path
    commits: dict[str, str]  # repo -> the commit every file is fetched at
    files: tuple[RemoteFile, ...]

    @property
    def missing(self) -> list[RemoteFile]:
        return [f for f in self.files if f.local_size != f.size]

    @property
    def to_fetch(self) -> int:
        return sum(f.size for f in self.missing)

    @property
    def present(self) -> int:
        return sum(f.size for f in self.files) - self.to_fetch


def fetchable() -> list[str]:
    """The names `fetch` takes: every model config that names its hub repositories, taehv and lightvae."""
    return [n for n in model_names() if load_model_config(n).hub is not None] + [TAEHV, LIGHTVAE]


def wan_files() -> tuple[str, ...]:
    """What the engine reads from a Wan2.1 repository (engine.checkpoint.WeightsLayout): not the base
    DiT's diffusion_pytorch_model*.safetensors (the largest files there), which the StreamDiffusionV2
    causal checkpoint replaces, nor the tokenizer's spiece.model (tokenizer.json holds the vocabulary)."""
    from engine.checkpoint import T5_FILE, TOKENIZER_DIR, VAE_FILE  # torch is imported only once needed

    return ("config.json", T5_FILE, VAE_FILE, f"{TOKENIZER_DIR}/*.json")


def _check_model(root: Path, cfg: ModelConfig) -> list[Path]:
    from engine.weights_check import check_model_weights

    return check_model_weights(root, cfg)


def _check_taehv(root: Path) -> list[Path]:
    from engine.weights_check import check_taehv_file

    return check_taehv_file(root / TAEHV_FILE)


def _check_lightvae(root: Path) -> list[Path]:
    from engine.weights_check import check_lightvae_file

    return check_lightvae_file(root / LIGHTVAE_FILE)


def model_target(cfg: ModelConfig) -> Target:
    if cfg.hub is None or cfg.weights_folder is None or cfg.causal_checkpoint is None:
        raise FetchError(f"model {cfg.name} has no published weights to fetch; choose one of {', '.join(fetchable())}")
    causal_dir = Path(cfg.causal_checkpoint).parent.as_posix()
    return Target(
        name=cfg.name,
        sources=(Source(cfg.hub.wan, wan_files(), cfg.weights_folder), Source(cfg.hub.causal, (f"{causal_dir}/*",))),
        check=lambda root: _check_model(root, cfg),
        use=f"--model {cfg.name} --weights {{root}}",
    )


def resolve_target(model: str) -> Target:
    """`taehv`, `lightvae`, a model name, or a model config file (.yaml) with a `hub` section."""
    if model == TAEHV:
        return Target(TAEHV, (Source(TAEHV_REPO, (TAEHV_FILE,)),), _check_taehv,
                      use=f"--decoder taehv --taehv-weights {{root}}/{TAEHV_FILE}")
    if model == LIGHTVAE:
        return Target(LIGHTVAE, (Source(TAEHV_REPO, (LIGHTVAE_FILE,)),), _check_lightvae,
                      use=f"--decoder lightvae --lightvae-weights {{root}}/{LIGHTVAE_FILE}")
    if model not in model_names() and not model.endswith((".yaml", ".yml")):
        raise FetchError(f"unknown model {model!r}; choose one of {', '.join(fetchable())}")
    try:
        return model_target(load_model_config(model))
    except ConfigError as exc:
        raise FetchError(str(exc)) from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def hub_error(repo: str, exc: BaseException, hub: str) -> FetchError:
    """The hub library's exceptions as one line that says what to do (`hub`: the endpoint asked)."""
    if isinstance(exc, GatedRepoError):
        return FetchError(f"{repo} is gated: accept its terms at {hub}/{repo} while logged in, then give "
                          "this command your token (HF_TOKEN=... or `hf auth login`)")
    if isinstance(exc, RepositoryNotFoundError):
        return FetchError(f"{repo}: not found on {hub}, or it needs a token (HF_TOKEN=... or `hf auth login`)")
    if isinstance(exc, (RevisionNotFoundError, RemoteEntryNotFoundError)):
        return FetchError(f"{repo}: {_one_line(exc).split(' Client Error. ')[-1]}")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return FetchError(f"{repo}: the hub at {hub} answered HTTP {status}; try again later")
    if isinstance(exc, (httpx2.HTTPError, OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return FetchError(f"cannot reach the hub at {hub} ({_one_line(exc) or type(exc).__name__}); "
                          "check the network (or HF_ENDPOINT) and run the command again")
    if isinstance(exc, OSError) and exc.errno is not None:
        return FetchError(f"cannot write {exc.filename or 'the files'}: {exc.strerror}")
    return FetchError(f"{repo}: {type(exc).__name__}: {_one_line(exc)}")


def plan(target: Target, root: Path, api: HfApi) -> Plan:
    """Every file to have under `root`, with the hub's sizes, at each repository's current commit."""
    commits: dict[str, str] = {}
    files: list[RemoteFile] = []
    for src in target.sources:
        try:
            info = api.model_info(src.repo, revision=REVISION, files_metadata=True)
        except Exception as exc:
            raise hub_error(src.repo, exc, api.endpoint) from None
        listed = {s.rfilename: s for s in info.siblings or []}
        commits[src.repo] = str(info.sha)
        for pattern in src.patterns:
            chosen = sorted(filter_repo_objects(listed, allow_patterns=[pattern]))
            if not chosen:
                raise FetchError(f"{src.repo} has no file matching {pattern} (at {info.sha}); "
                                 f"the layout the engine reads needs it")
            for path in chosen:
                s = listed[path]
                size = s.size if s.size is not None else (s.lfs.size if s.lfs else None)
                if size is None:
                    raise FetchError(f"{src.repo}: the hub gave no size for {path}")
                files.append(RemoteFile(src, path, int(size), root / src.subdir / path))
    return Plan(root, commits, tuple(files))


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def describe(target: Target, p: Plan) -> Iterator[str]:
    repos = ", ".join(f"{r}@{c[:8]}" for r, c in p.commits.items())
    yield f"{target.name}: {_files(len(p.files))} from {repos} into {p.root}"
    for f in p.files:
        have = f.local_size
        state = "present" if have == f.size else ("partial, fetched again" if have is not None else "to fetch")
        yield f"  {_gb(f.size):>11}  {f.local.relative_to(p.root)}  ({state})"
    yield (f"will fetch {_gb(p.to_fetch)} in {_files(len(p.missing))} "
           f"({_gb(p.present)} already in {p.root})")


def _free_bytes(root: Path) -> int:
    probe = root
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def download(p: Plan, api: HfApi) -> None:
    """Fetch what is missing; a file present at the wrong size is removed first (a truncated copy with
    the library's 'complete' mark would otherwise be kept)."""
    need, free = p.to_fetch, _free_bytes(p.root)
    if need > free:
        raise FetchError(f"not enough disk space under {p.root}: {_gb(need)} to fetch, {_gb(free)} free")
    for f in p.missing:
        if f.local_size is not None:
            log.warning("%s is %d of %d bytes: fetching it again", f.local, f.local_size, f.size)
            f.local.unlink()
    by_source: dict[Source, list[str]] = {}
    for f in p.files:
        by_source.setdefault(f.source, []).append(f.path)
    for src, paths in by_source.items():
        try:
            # every file, not only the missing ones: the library confirms the present ones (commit, etag
            # or sha256) and fetches them again if they are not the hub's
            snapshot_download(src.repo, revision=p.commits[src.repo], local_dir=p.root / src.subdir,
                              allow_patterns=[glob.escape(x) for x in paths], endpoint=api.endpoint)
        except Exception as exc:
            raise hub_error(src.repo, exc, api.endpoint) from None
    wrong = [f"{f.local} ({f.local_size} of {f.size} bytes)" for f in p.files if f.local_size != f.size]
    if wrong:
        raise FetchError(f"incomplete after the download: {', '.join(wrong)}; run the command again")


def fetch(model: str, root: Path, dry_run: bool = False, endpoint: Optional[str] = None) -> list[Path]:
    """Plan, report, download, check. Returns the files the strict loaders accepted ([] for a dry run).
    Raises FetchError with a one-line reason."""
    target = resolve_target(model)
    root = Path(root).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise FetchError(f"--to {root}: not a folder")
    api = HfApi(endpoint=endpoint)
    p = plan(target, root, api)
    for line in describe(target, p):
        log.info("%s", line)
    if dry_run:
        return []
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create {root}: {exc.strerror}") from None
    download(p, api)
    from engine.checkpoint import CheckpointError

    try:
        checked = target.check(root)
    except CheckpointError as exc:
        raise FetchError(f"downloaded, but {_one_line(exc)} (if the hub's copy is fine, delete the file and "
                         "run the command again)") from None
    log.info("the strict loaders accepted %s; use them with %s", _files(len(checked)), target.use.format(root=root))
    return checked
