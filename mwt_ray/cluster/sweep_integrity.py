"""Keyed hashes over a sweep's Tune folder, so that ``sweep --resume`` never unpickles what someone else wrote.

``tune.Tuner.restore(<sweep folder>/tune)`` deserialises files from the sweep folder with pickle
(cloudpickle), and the sweep folder may sit on a disk that other people can write (``/mnt/shared``
in ``cluster.yaml``). Anyone who could write there could run code as the next user who resumes.
``sign_sweep`` writes HMAC-SHA256s of the Tune folder's files, keyed with a secret that only this
user can read; ``verify_sweep``, called before a restore, refuses a folder whose files are not
exactly the signed ones, with a ``SetupError`` (one ``error:`` line, exit status 2).

What Ray 2.60's restore deserialises (read in the installed ``ray/``, and each one seen to run a
planted payload on this machine; ``tests/test_sweep_integrity.py`` plants one in each):

- ``tuner.pkl``: ``cloudpickle.loads`` in ``TunerInternal._restore_from_path_or_uri``
  (``tune/impl/tuner_internal.py``), the first thing ``Tuner.restore`` reads. Tune writes it once,
  when a fresh ``Tuner`` is made, and never again (not on restore).
- ``experiment_state-<session>.json``: JSON whose ``{"_type": "CLOUDPICKLE_FALLBACK", "value": hex}``
  objects, anywhere in it, are cloudpickle-loaded by ``_loads_with_cloudpickle``
  (``tune/utils/serialization.py``); read by ``ExperimentAnalysis._load_trials``
  (``tune/analysis/experiment_analysis.py``) inside ``Tuner.restore`` and by
  ``TuneController.resume`` (``tune/execution/tune_controller.py``) in ``fit()``; each trial's
  state in it holds more hex pickles (``Trial.__setstate__``, ``tune/experiment/trial.py``). The
  newest name (``max``) is the one read (``_find_newest_experiment_checkpoint``,
  ``tune/execution/experiment_state.py``), so an *added* file is as dangerous as a changed one.
- ``search_gen_state-<session>.json``: a cloudpickle despite its name (``_atomic_save`` /
  ``_load_newest_checkpoint``, ``tune/utils/util.py``), read by ``SearchGenerator.restore_from_dir``
  (``tune/search/search_generator.py``); ``basic-variant-state-<session>.json`` likewise
  (``tune/search/basic_variant.py``) when the searcher is Tune's default one.
- ``searcher-state-<session>.pkl``: ``Searcher.restore_from_dir`` (``tune/search/searcher.py``)
  globs it, takes the ``max`` name and calls ``restore``: ``ConcurrencyLimiter`` and
  ``OptunaSearch`` unpickle it (``tune/search/concurrency_limiter.py``,
  ``tune/search/optuna/optuna_search.py``).
- ``callback-states-<session>.pkl``: ``CallbackList.restore_from_dir`` (``tune/callback.py``) loads
  the newest one whenever any exists, even for a sweep whose callbacks never wrote one.
- ``<trial folder>/error.pkl``: ``Trial.get_pickled_error`` (``tune/experiment/trial.py``), read for
  each errored trial when results are collected (``ResultGrid``, ``tune/result_grid.py``; e.g.
  ``get_results()`` on a restored tuner, or a resume that does not re-run errored trials), and by
  ``Result.from_path`` (``air/result.py``).
- ``<trial folder>/params.pkl`` (the trial's config, by ``JsonLoggerCallback``): no restore path
  reads it in Ray 2.60, but it is a pickle beside the others.

``TuneController.resume`` first copies every top-level ``*.json`` and ``*.pkl`` of the storage
folder into the driver's local staging folder (``sync_down_experiment_state``) and globs there.
The project's own trial files (``<sweep>/trials/``: ``checkpoint.pt`` loaded with
``weights_only=True``, JSON, CSV) and ``sweep.json`` are not pickles and are not covered here.

The rule: every regular file under the Tune folder, at any depth, dot files included, is signed,
and a symlink or any other non-regular entry is refused. Not just the names above, because Tune
picks what it unpickles by name patterns that are not the suffixes (a ``.json`` that is a pickle,
JSON with pickles inside) and that a Ray upgrade may change; signing everything means no new pattern
slips through, and it costs little: a sweep's trials keep their checkpoints in ``trials/``, so the
Tune folder holds only small state and log files. Tune writes no links or special files.

``verify_sweep`` refuses: no manifest (the sweep never signed, e.g. it was SIGKILLed), a manifest
that is malformed, altered, or signed with another secret (another user's, or a replaced one), a
file that changed, and a file the manifest does not list. A listed file that is gone is accepted:
a missing file runs no code (Tune then reads an older signed state, or fails to restore).

Limits: the check is of the folder at rest between runs. Signing after a run blesses whatever is in
the folder then, so a writer active *during* the run is not stopped; ``sign_sweep`` keeps the first
signature of ``tuner.pkl`` (which Tune never rewrites), so signing once right after the ``Tuner`` is
made pins it for good. A writer who swaps a file between ``verify_sweep`` and the restore's read is
not stopped either (the seconds from the check to Tune's reads in ``restore`` and at the start of
``fit``); a sweep folder that only its owner can write closes both.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
import time
from pathlib import Path

from ..jobs.setup import SetupError

__all__ = ["SweepIntegrityError", "sign_sweep", "verify_sweep", "manifest_path", "config_dir", "secret_key",
           "check_signing_key", "CONFIG_DIR_ENV", "KEY_FILE", "MANIFEST_SUFFIX"]

CONFIG_DIR_ENV = "MWT_RAY_CONFIG_DIR"  # the folder holding the secret itself (tests isolate it with this)
KEY_FILE = "sweep-signing.key"
MANIFEST_SUFFIX = ".integrity.json"  # <sweep>/tune -> <sweep>/tune.integrity.json
MANIFEST_FORMAT = "mwt-ray sweep integrity 1"
WRITE_ONCE = ("tuner.pkl",)  # Tune writes these once per experiment: a later signing keeps the first signature
START_OVER = "start a new sweep (without --resume)"

_KEY_HEX = 64  # 32 random bytes, as hex text
_MANIFEST_MAX_BYTES = 64 << 20  # far above any real manifest; a planted huge one is refused, not read


class SweepIntegrityError(SetupError):
    """The Tune folder a resume would unpickle is not exactly what this user's sweep signed."""


class _NotRegular(Exception):
    """A path that became a link or a special file between listing it and opening it."""


# --------------------------------------------------------------------------- the secret

def config_dir() -> Path:
    """``$MWT_RAY_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/mwt-ray``, else ``~/.config/mwt-ray``."""
    explicit = os.environ.get(CONFIG_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return base / "mwt-ray"


def _show(path: str | Path) -> str:
    """A path for a one-line message: control characters (a newline in a planted name) escaped."""
    text = str(path)
    return text if text.isprintable() else ascii(text)


def _own_uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None


def _check_folder(folder: Path, info: os.stat_result) -> None:
    """Refuse a secret's folder that is not a folder of this user's (``lstat``: a link is refused too)."""
    if not stat.S_ISDIR(info.st_mode):
        raise SweepIntegrityError(f"{_show(folder)} (where mwt-ray keeps its signing secret) is not a folder; "
                                  f"remove it or set {CONFIG_DIR_ENV} to a private folder")
    if _own_uid() is not None and info.st_uid != _own_uid():
        raise SweepIntegrityError(f"{_show(folder)} (where mwt-ray keeps its signing secret) belongs to another user; "
                                  f"set {CONFIG_DIR_ENV} to a folder of your own")


def _private_folder(folder: Path) -> None:
    """Create ``folder`` (mode 0700) or make sure an existing one is this user's and only this user's:
    whoever can write it could replace the secret with one they know."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    _check_folder(folder, info)
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(folder, 0o700)  # mkdir's mode is cut by the umask, and an older folder may be looser


def _read_key(path: Path) -> bytes:
    # O_NOFOLLOW: a link could point at a file others can read or change.
    try:
        # O_NONBLOCK: a FIFO planted as the secret would otherwise block the open until a writer comes.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as error:
        raise SweepIntegrityError(f"mwt-ray's signing secret {_show(path)} cannot be read "
                                  f"({error.strerror or error}); it must be a plain file of yours, mode 0600") from None
    try:
        info = os.fstat(fd)
        foreign = _own_uid() is not None and info.st_uid != _own_uid()
        if foreign or stat.S_IMODE(info.st_mode) & 0o077 or not stat.S_ISREG(info.st_mode):
            raise SweepIntegrityError(
                f"{_show(path)} (mwt-ray's signing secret) is not private (mode {stat.S_IMODE(info.st_mode):04o}, "
                f"owner uid {info.st_uid}): anyone who read it can forge signed sweeps; delete it (a new one is "
                f"made) and {START_OVER}")
        text = os.read(fd, 4 * _KEY_HEX).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if len(text) != _KEY_HEX or any(c not in "0123456789abcdef" for c in text):
        raise SweepIntegrityError(f"{_show(path)} is not an mwt-ray signing secret (64 hex digits); delete it "
                                  f"(a new one is made) and {START_OVER}")
    return bytes.fromhex(text)


def check_signing_key() -> None:
    """The checks ``secret_key()`` makes on the folder and the secret, creating and changing nothing:
    a sweep runs them in its preflight, so a secret it could not use (a loose mode, a link, a folder
    that is a file) refuses the sweep before its folder or MLflow run exist. Raises SweepIntegrityError."""
    folder = config_dir()
    try:
        info = folder.lstat()
    except FileNotFoundError:  # made on first use: where it would go must take a folder
        from ..core.files import writable_folder_error

        reason = writable_folder_error(folder)
        if reason:
            raise SweepIntegrityError(f"{_show(folder)} (where mwt-ray keeps its signing secret) cannot be made "
                                      f"({reason}); set {CONFIG_DIR_ENV} to a private folder") from None
        return
    except OSError as error:
        raise SweepIntegrityError(f"{_show(folder)} (where mwt-ray keeps its signing secret) cannot be read "
                                  f"({error.strerror or error}); set {CONFIG_DIR_ENV} to a private folder") from None
    _check_folder(folder, info)
    try:
        _read_key(folder / KEY_FILE)
    except FileNotFoundError:
        pass  # made on first use


def secret_key(*, create: bool = True) -> bytes:
    """This user's signing secret (32 bytes) from ``config_dir()/sweep-signing.key`` (mode 0600);
    made on first use when ``create``, else a missing one is refused."""
    folder = config_dir()
    path = folder / KEY_FILE
    if create:
        _private_folder(folder)
    try:
        return _read_key(path)
    except FileNotFoundError:
        if not create:
            raise SweepIntegrityError(
                f"there is no signing secret at {_show(path)}, so this user signed no sweep folder with it; "
                f"{START_OVER}") from None
    # A new secret goes into a private temporary file (mkstemp: O_EXCL, mode 0600) that is then hard-linked
    # into place: the link fails if another process made the secret meanwhile, and then both use that one,
    # and no reader ever sees a half-written secret.
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{KEY_FILE}.", suffix=".tmp")
    try:
        try:
            os.write(fd, (secrets.token_hex(_KEY_HEX // 2) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: create-if-absent directly
            try:
                out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(out, "wb") as handle:
                    handle.write(Path(temporary).read_bytes())
                    handle.flush()
                    os.fsync(handle.fileno())
    finally:
        os.unlink(temporary)
    _fsync_folder(folder)
    return _read_key(path)


def _key_id(key: bytes) -> str:
    """Names the secret in the manifest (to say "another user's key") without revealing it."""
    return hmac.new(key, b"mwt-ray key id", hashlib.sha256).hexdigest()[:16]


# --------------------------------------------------------------------------- files and their hashes

def _local(tune_folder: str | Path) -> Path:
    """The folder as an absolute local path. A URI (``s3://...``) is refused: read as a local path it
    would not exist, and "nothing there" must never pass for "checked"."""
    if "://" in str(tune_folder):
        raise SweepIntegrityError(f"cannot check the Tune folder {_show(tune_folder)}: only a local or mounted "
                                  f"folder can be signed and verified; keep the sweep folder on one")
    return Path(os.path.abspath(tune_folder))


def manifest_path(tune_folder: str | Path) -> Path:
    """``<sweep>/tune`` -> ``<sweep>/tune.integrity.json``: beside the Tune folder, not in it, so Tune
    never copies it into its staging folder and it is not one of the files it signs."""
    root = _local(tune_folder)
    return root.with_name(root.name + MANIFEST_SUFFIX)


def _walk(root: Path) -> tuple[list[str], list[str]]:
    """(regular files, other entries) under ``root`` as sorted POSIX paths relative to it. Never follows a
    link: a linked folder or file is reported as "other", to be refused."""
    files, other = [], []
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(root / rel if rel else root) as entries:
            for entry in entries:
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append(name)
                elif entry.is_file(follow_symlinks=False):
                    files.append(name)
                else:
                    other.append(name)
    return sorted(files), sorted(other)


def _file_mac(key: bytes, root: Path, rel: str) -> str:
    """HMAC-SHA256 of the file's name and bytes: the name is in it so that a signed file copied over
    another signed name (an old searcher state as ``tuner.pkl``) does not match."""
    # O_NOFOLLOW / O_NONBLOCK and fstat: a file swapped for a link or a FIFO after the listing is neither
    # followed nor waited on.
    try:
        fd = os.open(root / rel, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            raise
        if os.path.islink(root / rel):
            raise _NotRegular(rel) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _NotRegular(rel)
        mac = hmac.new(key, b"mwt-ray file\0" + os.fsencode(rel) + b"\0", hashlib.sha256)
        while chunk := os.read(fd, 1 << 20):
            mac.update(chunk)
    finally:
        os.close(fd)
    return mac.hexdigest()


def _manifest_mac(key: bytes, body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return hmac.new(key, b"mwt-ray manifest\0" + canonical, hashlib.sha256).hexdigest()


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all. The temporary file has a random name made with O_EXCL
    (mkstemp), because a predictable one in a shared folder could be a planted link to a file of ours;
    the rename replaces a planted link at ``path`` itself rather than writing through it."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), 0o644)  # not secret: only the key is
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _load_manifest(path: Path) -> dict | None:
    """The manifest's fields when it is well-formed, else None (missing raises FileNotFoundError).
    Plain ``json.loads``: nothing in it is ever unpickled."""
    with open(path, "rb") as handle:
        raw = handle.read(_MANIFEST_MAX_BYTES + 1)
    if len(raw) > _MANIFEST_MAX_BYTES:
        return None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    files = manifest.get("files")
    # Hashes are ASCII text: hmac.compare_digest raises TypeError on any other str, and a planted
    # manifest must end in a refusal, not in that.
    if not (_ascii(manifest.get("key_id")) and _ascii(manifest.get("mac")) and isinstance(files, dict)
            and all(isinstance(k, str) and _ascii(v) for k, v in files.items())):
        return None
    return manifest


def _ascii(value) -> bool:
    return isinstance(value, str) and value.isascii()


def _body(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "mac"}


# --------------------------------------------------------------------------- sign and verify

def sign_sweep(tune_folder: str | Path) -> Path:
    """Sign every regular file under ``tune_folder`` (see the module's rule) into
    ``<tune_folder>.integrity.json``, written atomically; returns that path.

    Call it whenever the Tune experiment stops writing: after ``tuner.fit()`` returns or is
    interrupted, and once right after a fresh ``tune.Tuner(...)`` is made (which writes
    ``tuner.pkl``). A later signing keeps the first signature of ``tuner.pkl`` when an earlier
    manifest of this user's is valid, since Tune never rewrites that file: one replaced during a run
    is then refused at the next resume. Links and special files are left unsigned, so that
    ``verify_sweep`` refuses them. The secret is made on first use (``secret_key``)."""
    root = _local(tune_folder)
    if not root.is_dir():
        raise SweepIntegrityError(f"cannot sign {_show(root)}: it is not a folder")
    key = secret_key(create=True)
    target = manifest_path(root)

    pinned: dict[str, str] = {}
    try:
        earlier = _load_manifest(target)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        earlier = None
    if earlier is not None and hmac.compare_digest(earlier["key_id"], _key_id(key)) \
            and hmac.compare_digest(earlier["mac"], _manifest_mac(key, _body(earlier))):
        pinned = {name: earlier["files"][name] for name in WRITE_ONCE if name in earlier["files"]}

    files, _other = _walk(root)
    entries: dict[str, str] = {}
    for rel in files:
        try:
            entries[rel] = _file_mac(key, root, rel)
        except (FileNotFoundError, _NotRegular):
            continue  # gone or swapped for a link since the listing: left unsigned, refused if it is back
    for rel, mac in pinned.items():
        if rel in entries:
            entries[rel] = mac
    body = {"format": MANIFEST_FORMAT, "key_id": _key_id(key), "folder": root.name,
            "signed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": entries}
    _atomic_write(target, json.dumps({**body, "mac": _manifest_mac(key, body)}, indent=1, sort_keys=True) + "\n")
    return target


def verify_sweep(tune_folder: str | Path) -> int:
    """Before ``tune.Tuner.restore(tune_folder)``: raise ``SweepIntegrityError`` (a ``SetupError``,
    one line naming the file) unless every file under ``tune_folder`` is listed in its manifest with a
    matching keyed hash, under this user's secret. Returns how many files were checked; a folder that
    does not exist has nothing to unpickle and returns 0. Nothing is unpickled here."""
    root = _local(tune_folder)
    if not root.exists():
        return 0
    target = manifest_path(root)

    def refuse(what: str) -> SweepIntegrityError:
        return SweepIntegrityError(f"refusing to resume from {_show(root)}: {what}; resuming unpickles the files "
                                   f"there, and code someone else planted would run as you: {START_OVER}")

    try:
        manifest = _load_manifest(target)
    except FileNotFoundError:
        raise refuse(f"it was never signed (no {_show(target.name)} beside it: the sweep was killed before it "
                     f"could sign, or did not write this folder)") from None
    except OSError as error:
        raise refuse(f"its manifest {_show(target)} cannot be read ({error.strerror or error})") from None
    if manifest is None:
        raise refuse(f"{_show(target)} is not a valid mwt-ray integrity manifest")
    key = secret_key(create=False)
    if not hmac.compare_digest(manifest["key_id"], _key_id(key)):
        raise refuse(f"{_show(target)} was signed with another secret (another user's, or one that replaced "
                     f"{_show(config_dir() / KEY_FILE)})")
    if not hmac.compare_digest(manifest["mac"], _manifest_mac(key, _body(manifest))):
        raise refuse(f"{_show(target)} was altered after it was signed")

    if not root.is_dir():
        raise refuse(f"{_show(root)} is not a folder")
    signed = manifest["files"]
    try:
        files, other = _walk(root)
    except OSError as error:  # a folder in it that cannot be listed: Tune could not restore it either
        raise refuse(f"{_show(error.filename or root)} cannot be listed ({error.strerror or error})") from None
    odd = set(other)
    problems = []
    # Top-level files first (tuner.pkl, the experiment and searcher states: what every restore reads),
    # then the trials' folders, so that the one line names the file that matters most.
    for rel in sorted(files + other, key=lambda name: (name.count("/"), name)):
        if rel in odd:
            problems.append(f"{_show(root / rel)} is a link or special file, which a sweep never writes")
            continue
        if rel not in signed:
            problems.append(f"{_show(root / rel)} is not in the signed manifest (added after the sweep signed)")
            continue
        try:
            mac = _file_mac(key, root, rel)
        except FileNotFoundError:
            continue  # gone since the listing: a missing file runs nothing
        except _NotRegular:
            problems.append(f"{_show(root / rel)} is a link or special file, which a sweep never writes")
            continue
        except OSError as error:
            problems.append(f"{_show(root / rel)} cannot be read ({error.strerror or error})")
            continue
        if not hmac.compare_digest(mac, signed[rel]):
            problems.append(f"{_show(root / rel)} changed after the sweep signed it")
    if problems:
        more = f" (and {len(problems) - 1} more file{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise refuse(problems[0] + more)
    return len(files)
