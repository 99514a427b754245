"""Hostile edges (issue 13): the world attacks the pipeline the way real machines, archives,
configurations and servers do: FIFOs and devices behind media names, truncated and replaced
recordings, unreadable files, keys pasted with quotes, keys echoed back, dripping servers,
absurd ``Retry-After`` values, huge answers, read-only or full disks, a second database on one
output folder, read-only databases, and a translation started beside its transcription.

The rule behind every test: a fault of the machine or the configuration stops the run before it
pays (exit 2, one clear message); a fault of one file fails that file alone with its reason;
nothing ever hangs. Faults are real where this machine allows it (a FIFO, a symlink to
/dev/zero, a read-only or full tmpfs, a process without root's file-permission override) and
injected at the write seam only where it does not.
"""

import errno
import gzip
import json
import os
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest

from benchmarks import mediagen
from tests.conftest import ROOT, recorded_file, script_env
from tests.fake_stt import ELEVENLABS_PATH, OPENAI_PATH, FakeSTT, env_for
from benchmarks.fake_translate import FakeDeepL
from benchmarks.fakeserver import Fault, FakeServer, json_response
from tests.test_faults import TRANSCRIBE, TRANSLATE, command, db_rows, run, tones
from tests.test_parallel_translation import FAKES, make_archive

pytestmark = pytest.mark.faults

STATUS = str(ROOT / "tools" / "status.py")
CHECK = str(ROOT / "tools" / "check_missing_transcripts.py")
# Without these capabilities root obeys file permissions like any user (chmod 000 stops it).
_DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
             "--inh-caps=-dac_override,-dac_read_search"]


@pytest.fixture
def stt():
    server = FakeServer().start()
    yield FakeSTT(server)
    server.stop()


def jobs_by_name(tmp_path, stage="transcription"):
    return {Path(r["path_display"]).name: r for r in db_rows(
        tmp_path, "SELECT j.*, m.path_display, m.sha256 FROM jobs j JOIN media_files m USING (file_id)"
                  " WHERE stage = ?", (stage,))}


def without_file_permission_override(cmd: list) -> list:
    """``cmd`` run so that file permissions apply to it (root normally ignores them)."""
    if os.geteuid() != 0:
        return cmd
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot make a file unreadable to this process")
    return [*_DROP_DAC, *cmd]


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(path, options) mounts a small tmpfs (skips where mounting is not allowed)."""
    mounted = []

    def mount(path: Path, options: str = "size=4m") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- 1. a FIFO or a device behind a media name ----------------------------------------------------

@pytest.mark.timeout(90)
def test_fifo_and_device_behind_media_names_are_skipped_not_read(stt, tmp_path):
    tones(tmp_path / "in", 1)
    os.mkfifo(tmp_path / "in" / "x.wav")
    os.symlink("/dev/zero", tmp_path / "in" / "y.mp3")
    result = run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(tmp_path / "in"), "--dry-run", timeout=45)
    assert result.returncode == 0, result.stderr
    assert "2 not regular files" in result.stderr
    assert [r["path_display"] for r in db_rows(tmp_path, "SELECT path_display FROM media_files")] == [
        str(tmp_path / "in" / "f000.wav")]


# -- 2. truncated or too short audio ------------------------------------------------------------

def _wav_claiming(path: Path, claimed_seconds: float, samples_present: int, rate: int = 16000) -> Path:
    """A 16-bit mono WAV whose header promises ``claimed_seconds`` but holds fewer samples."""
    data_bytes = int(claimed_seconds * rate) * 2
    header = (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt " +
              struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", data_bytes))
    path.write_bytes(header + struct.pack(f"<{samples_present}h", *([1000, -1000] * samples_present)[:samples_present]))
    return path


def test_truncated_and_too_short_audio_fail_without_a_request(stt, tmp_path):
    folder = tmp_path / "in"
    tones(folder, 1)
    truncated = _wav_claiming(folder / "truncated.wav", 1.5, 8)
    assert truncated.stat().st_size == 60
    mediagen.make_tone(folder / "short.wav", seconds=0.05)
    result = run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(folder), "--workers", "2")
    assert result.returncode == 1, result.stderr
    rows = jobs_by_name(tmp_path)
    assert rows["f000.wav"]["status"] == "completed"
    assert (rows["truncated.wav"]["status"], rows["truncated.wav"]["error_class"]) == ("failed", "truncated")
    assert "1.5" in rows["truncated.wav"]["error_message"]
    assert (rows["short.wav"]["status"], rows["short.wav"]["error_class"]) == ("failed", "too_short")
    assert rows["short.wav"]["attempts"] == rows["truncated.wav"]["attempts"] == 1
    assert stt.server.count() == 1  # only the good file was sent


# -- 3. a file this process may not read --------------------------------------------------------

def test_an_unreadable_file_fails_as_permission_denied(stt, tmp_path):
    folder = tmp_path / "in"
    tones(folder, 2)
    assert run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(folder), "--dry-run").returncode == 0
    os.chmod(folder / "f001.ogg", 0)
    cmd = without_file_permission_override(command(TRANSCRIBE, tmp_path, "--workers", "1"))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=script_env(**env_for(stt)))
    assert result.returncode == 1, result.stderr
    rows = jobs_by_name(tmp_path)
    assert rows["f000.wav"]["status"] == "completed"
    assert (rows["f001.ogg"]["status"], rows["f001.ogg"]["error_class"]) == ("failed", "permission_denied")
    assert rows["f001.ogg"]["attempts"] == 1
    assert stt.server.count() == 1


# -- 4. a recording replaced after registration ---------------------------------------------------

def test_a_recording_replaced_after_registration_is_never_sent_as_the_old_one(stt, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    path = mediagen.make_tone(folder / "a.wav", freq=440, seconds=1.0)
    assert run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(folder), "--dry-run").returncode == 0
    old_sha = db_rows(tmp_path, "SELECT sha256 FROM media_files")[0][0]
    before = path.stat()
    mediagen.make_tone(folder / "new.wav", freq=880, seconds=1.0)  # same size, other content
    os.replace(folder / "new.wav", path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))
    result = run(TRANSCRIBE, tmp_path, env_for(stt), "--workers", "1")
    assert result.returncode == 1, result.stderr
    jobs = {r["sha256"]: r for r in db_rows(
        tmp_path, "SELECT j.*, m.sha256 FROM jobs j JOIN media_files m USING (file_id) WHERE stage='transcription'")}
    assert (jobs[old_sha]["status"], jobs[old_sha]["error_class"]) == ("failed", "media_changed")
    [new] = [row for sha, row in jobs.items() if sha != old_sha]
    assert new["status"] == "completed"
    assert "tone880" in recorded_file(tmp_path / "out", json.loads(new["outputs"])["txt"]).read_text()
    assert stt.server.count() == 1  # the new content once; the old job paid for nothing


# -- 5. a key that cannot be an HTTP header value -------------------------------------------------

@pytest.mark.parametrize("key", ["\u201csk-test-openai-0000\u201d", "sk-test openai-0000", "sk-test-openai-0000\n"])
def test_a_key_that_cannot_be_a_header_value_stops_before_any_request(key, stt, tmp_path):
    tones(tmp_path / "in", 2)
    result = run(TRANSCRIBE, tmp_path, {**env_for(stt), "OPENAI_API_KEY": key}, "--input", str(tmp_path / "in"),
                 "--provider", "openai", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "OPENAI_API_KEY" in result.stderr and result.stderr.count("error: ") == 1
    assert "sk-test" not in result.stderr
    assert stt.server.count() == 0


def test_a_translation_key_with_curly_quotes_is_a_configuration_error(tmp_path):
    make_archive(tmp_path, n_german=2, n_english=0)
    with FakeDeepL() as fake:
        result = run(TRANSLATE, tmp_path, {**fake.env(), "DEEPL_API_KEY": "\u201cdeepl-key-42\u201d"},
                     "--language", "en", timeout=60)
        assert fake.server.count() == 0
    assert result.returncode == 2 and "DEEPL_API_KEY" in result.stderr and "deepl-key-42" not in result.stderr


# -- 6. secrets in every form they take -----------------------------------------------------------

def _forms(secret: str) -> set[str]:
    return {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
            urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}


def _everything_written(tmp_path, results) -> list[str]:
    texts = [r.stdout + r.stderr for r in results]
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix not in (".wav", ".ogg", ".mp3"):
            data = path.read_bytes()
            texts.append((gzip.decompress(data) if path.suffix == ".gz" else data).decode("latin-1"))
    return texts


def test_secrets_never_leak_in_any_form(tmp_path):
    openai_key = 'sk-CAN"ARY\\quote-7f3a'
    short_key = "k9Q"
    password = "pw-CANARY/proxy"
    server = FakeServer().start()
    try:
        stt = FakeSTT(server, openai_key=openai_key, elevenlabs_key=short_key)
        real_openai = server.routes[("POST", OPENAI_PATH)]

        def echo_openai(request):  # a provider that echoes the credentials it got in a 200 body
            response = real_openai(request)
            if response.status == 200:
                response.body["debug"] = {"authorization": request.headers.get("authorization")}
            return response

        def echo_elevenlabs(request):  # ... and in an error body
            return json_response({"detail": {"status": "invalid_request",
                                             "message": f"bad request for key {request.headers.get('xi-api-key')}"}},
                                 400)

        server.routes[("POST", OPENAI_PATH)], server.routes[("POST", ELEVENLABS_PATH)] = echo_openai, echo_elevenlabs
        tones(tmp_path / "in", 2)
        debug = {"VERBATIM_DEBUG": "1"}
        results = [run(TRANSCRIBE, tmp_path, {**env_for(stt), **debug}, "--input", str(tmp_path / "in"),
                       "-v", "--json", "--provider", "openai")]
        (tmp_path / "el").mkdir()
        (tmp_path / "proxy").mkdir()
        results.append(run(TRANSCRIBE, tmp_path / "el", {**env_for(stt), **debug}, "--input", str(tmp_path / "in"),
                           "-v", "--json", "--provider", "elevenlabs"))
        userinfo = f"verbatim:{urllib.parse.quote(password, safe='')}@"
        userinfo_url = stt.openai_base_url.replace("http://", "http://" + userinfo)
        results.append(run(TRANSCRIBE, tmp_path / "proxy", {**env_for(stt), **debug, "OPENAI_BASE_URL": userinfo_url},
                           "--input", str(tmp_path / "in"), "-v", "--json", "--provider", "openai"))
        results.append(subprocess.run([sys.executable, STATUS, "--db", str(tmp_path / "jobs.db"), "--files",
                                       "--json", "--failed"], capture_output=True, text=True,
                                      env=script_env(**env_for(stt))))
    finally:
        server.stop()
    assert results[0].returncode == 0, results[0].stderr
    assert "DEBUG" in results[2].stderr
    texts = _everything_written(tmp_path, results)
    for secret in (openai_key, short_key, password):
        for form in _forms(secret):
            assert all(form not in text for text in texts), form


# -- 7. a dripping server -----------------------------------------------------------------------

def _first_n(n: int, fault: Fault):
    left, lock = {"n": n}, threading.Lock()

    def inject(request):
        with lock:
            if left["n"]:
                left["n"] -= 1
                return fault
        return None
    return inject


@pytest.mark.timeout(120)
@pytest.mark.parametrize("provider", ["openai", "elevenlabs"])
def test_a_dripping_answer_meets_the_total_deadline(provider, stt, tmp_path):
    tones(tmp_path / "in", 2)
    stt.server.fault = _first_n(1, Fault("drip", body={"text": "x" * 200}, interval=0.3))
    finished_before = stt.server.drips_finished
    result = run(TRANSCRIBE, tmp_path, {**env_for(stt), "VERBATIM_REQUEST_TIMEOUT": "3"}, "--input",
                 str(tmp_path / "in"), "--provider", provider, "--workers", "2", timeout=100)
    assert result.returncode == 0, result.stderr
    assert stt.server.drips_finished == finished_before  # the run was done before the drip (60 s) was
    assert {r[0] for r in db_rows(tmp_path, "SELECT status FROM jobs WHERE stage='transcription'")} == {"completed"}
    assert db_rows(tmp_path, "SELECT 1 FROM events WHERE error_class = 'timeout'")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("provider", sorted(FAKES))
def test_a_dripping_translation_answer_meets_the_total_deadline(provider, tmp_path):
    make_archive(tmp_path, n_german=2, n_english=0)
    with FAKES[provider]() as fake:
        fake.server.fault = _first_n(1, Fault("drip", body={"pad": "x" * 200}, interval=0.3))
        result = run(TRANSLATE, tmp_path, {**fake.env(), "VERBATIM_REQUEST_TIMEOUT": "2"}, "--language", "en",
                     "--provider", provider, timeout=100)
        assert fake.server.drips_finished == 0  # the run was done before the drip (a minute) was
    assert result.returncode == 0, result.stderr
    assert db_rows(tmp_path, "SELECT 1 FROM events WHERE error_class = 'timeout'")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("provider", sorted(FAKES))
def test_a_translation_answer_held_back_times_out_per_the_setting(provider, tmp_path):
    """A translate server that holds its answer: the request ends after VERBATIM_REQUEST_TIMEOUT (read
    here from the .env file), is retried, and the run completes; it never waits for the server."""
    make_archive(tmp_path, n_german=2, n_english=0)
    (tmp_path / "settings.env").write_text("VERBATIM_REQUEST_TIMEOUT=1\n")
    with FAKES[provider]() as fake:
        fake.server.fault = _first_n(1, Fault("hang"))
        result = run(TRANSLATE, tmp_path, fake.env(), "--language", "en", "--provider", provider,
                     "--env-file", str(tmp_path / "settings.env"), timeout=100)
        held = fake.server.holding  # the run ended while the server still held the answer back
    assert result.returncode == 0, result.stderr
    assert held >= 1
    assert db_rows(tmp_path, "SELECT 1 FROM events WHERE error_class = 'timeout'")


class TrickleReader:
    """A server on 127.0.0.1 that reads what it is sent at a trickle (1 KiB every 10 ms, with a small
    receive buffer) and never answers: every send waits a moment, none long enough for a timeout."""

    def __init__(self):
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self.received = 0  # bytes read so far, all connections
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self._sock.getsockname()[1]

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn):
        with conn:
            conn.settimeout(0.2)
            while not self._stop.wait(0.01):
                try:
                    data = conn.recv(1024)
                    if not data:
                        return
                    self.received += len(data)
                except socket.timeout:
                    continue
                except OSError:
                    return

    def close(self):
        self._stop.set()
        self._sock.close()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("provider", ["openai", "elevenlabs"])
def test_an_upload_read_at_a_trickle_meets_the_total_deadline(provider, tmp_path):
    from pipeline.errors import RetryableError
    from transcription import PROVIDERS

    upload = tmp_path / "audio.ogg"
    upload.write_bytes(os.urandom(8 << 20))  # beyond what the socket buffers take at once
    server = TrickleReader()
    try:
        env = {"OPENAI_API_KEY": "sk-test-openai-0000", "OPENAI_BASE_URL": server.url + "/v1",
               "ELEVENLABS_API_KEY": "el-test-0000", "ELEVENLABS_BASE_URL": server.url,
               "VERBATIM_REQUEST_TIMEOUT": "2"}
        transcriber = PROVIDERS[provider].from_env(env)
        with pytest.raises(RetryableError) as caught:
            transcriber.transcribe_chunk(str(upload))
        received = server.received
    finally:
        server.close()
    assert caught.value.error_class == "timeout"
    assert received < upload.stat().st_size // 4  # it gave up long before the upload (about 80 s) was read


# -- 8. hostile Retry-After -----------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("retry_after", ["inf", "1e16", "Fri, 31 Dec 9999 23:59:59 GMT", "0", "-3"])
def test_hostile_retry_after_ends_the_run_with_one_message(retry_after, stt, tmp_path):
    tones(tmp_path / "in", 3)
    stt.server.fault = lambda request: Fault(
        "status", 429, {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}},
        {"Retry-After": retry_after})
    result = run(TRANSCRIBE, tmp_path, {**env_for(stt), "VERBATIM_RATE_LIMIT_PATIENCE": "3"},
                 "--input", str(tmp_path / "in"), "--workers", "1", timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("error: ") == 1 and "429" in result.stderr
    assert {r[0] for r in db_rows(tmp_path, "SELECT status FROM jobs WHERE stage='transcription'")} == {"not_started"}
    assert stt.server.count() <= 20


def test_retry_after_is_capped_and_zero_means_normal_backoff():
    from pipeline.errors import MAX_RETRY_AFTER_SECONDS, parse_retry_after

    assert parse_retry_after({"Retry-After": "inf"}) == MAX_RETRY_AFTER_SECONDS
    assert parse_retry_after({"Retry-After": "1e16"}) == MAX_RETRY_AFTER_SECONDS
    assert parse_retry_after({"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}) == MAX_RETRY_AFTER_SECONDS
    assert parse_retry_after({"retry-after-ms": "nan"}) is None
    assert parse_retry_after({"Retry-After": "0"}) is None and parse_retry_after({"Retry-After": "-3"}) is None
    assert parse_retry_after({"Retry-After": "2"}) == 2.0


# -- 9. a huge answer ---------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("provider", ["openai", "elevenlabs"])
def test_an_answer_beyond_the_cap_fails_the_file_without_reading_it(provider, stt, tmp_path):
    tones(tmp_path / "in", 2)
    huge = {"text": "tone " * 2_000_000, "words": []}  # 10 MB of a well-formed answer
    stt.server.fault = _first_n(1, Fault("status", 200, huge))
    result = run(TRANSCRIBE, tmp_path, {**env_for(stt), "VERBATIM_MAX_RESPONSE_BYTES": "1000000"},
                 "--input", str(tmp_path / "in"), "--provider", provider, "--workers", "1")
    assert result.returncode == 1, result.stderr
    statuses = sorted((r["status"], r["error_class"]) for r in db_rows(
        tmp_path, "SELECT status, error_class FROM jobs WHERE stage='transcription'"))
    assert statuses == [("completed", None), ("failed", "invalid_response")]
    assert stt.server.count() == 2  # failed at once, not paid for again


_HUGE_TRANSLATIONS = {  # each provider's well-formed answer, 3 MB of it
    "deepl": {"translations": [{"text": "x" * 3_000_000}]},
    "microsoft": [{"translations": [{"text": "x" * 3_000_000, "to": "en"}]}],
    "openai": {"choices": [{"message": {"role": "assistant", "content": "[1] " + "x" * 3_000_000},
                            "finish_reason": "stop", "index": 0}], "usage": {}},
}


@pytest.mark.parametrize("provider", sorted(FAKES))
def test_a_huge_translation_answer_fails_the_job(provider, tmp_path):
    make_archive(tmp_path, n_german=1, n_english=0)
    with FAKES[provider]() as fake:
        fake.server.fault = lambda request: Fault("status", 200, _HUGE_TRANSLATIONS[provider])
        result = run(TRANSLATE, tmp_path, {**fake.env(), "VERBATIM_MAX_RESPONSE_BYTES": "1000000"},
                     "--language", "en", "--provider", provider)
        assert fake.server.count() == 1
    assert result.returncode == 1, result.stderr
    assert db_rows(tmp_path, "SELECT error_class FROM jobs WHERE stage='translation' AND language='en'")[0][0] \
        == "invalid_response"


# -- 10. the output folder and the disk ------------------------------------------------------------

def test_a_read_only_output_folder_stops_the_run_before_any_request(stt, tmp_path, mount_tmpfs):
    tones(tmp_path / "in", 3)
    mount_tmpfs(tmp_path / "out", "ro,size=1m")
    result = run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(tmp_path / "in"))
    assert result.returncode == 2, result.stderr
    assert str(tmp_path / "out") in result.stderr and "Read-only file system" in result.stderr
    assert stt.server.count() == 0


def test_a_full_output_disk_stops_the_run_before_any_request(stt, tmp_path, mount_tmpfs):
    tones(tmp_path / "in", 3)
    out = mount_tmpfs(tmp_path / "out", "size=256k")
    fd = os.open(out / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    result = run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(tmp_path / "in"))
    assert result.returncode == 2, result.stderr
    assert "No space left on device" in result.stderr
    assert stt.server.count() == 0


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_a_machine_fault_while_writing_stops_the_run_and_fails_no_file(error, stt, tmp_path, monkeypatch):
    import db_manager as dbm
    from pipeline.work import TranscriptionWork
    from pipeline import outputs
    from pipeline.limiter import ProviderLimiter, RunRequests
    from pipeline.media import register_inputs
    from pipeline.runner import RunOptions, Runner, StopSignal, exit_code
    from transcription import OpenAITranscriber

    tones(tmp_path / "in", 4)
    db = dbm.DatabaseManager(str(tmp_path / "jobs.db"))
    register_inputs(db, [str(tmp_path / "in")], [])

    def broken(handle, data):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(outputs, "_write_durably", broken)
    stop = StopSignal()
    work = TranscriptionWork(db, OpenAITranscriber(api_key=stt.openai_key, base_url=stt.openai_base_url),
                             RunRequests(ProviderLimiter("openai"), 1, stop.stop), str(tmp_path / "out"))
    summary = Runner(db, RunOptions("transcription", workers=1, batch_size=1, quiet=True), work, stop=stop).run()
    statuses = {r["status"] for r in db.jobs(stage="transcription")}
    db.close_all()
    assert exit_code([summary], stop) == 2 and os.strerror(error) in stop.account_error
    assert summary.failed == 0 and statuses == {"not_started"}
    assert stt.server.count() == 1  # the run stopped after the first answer it could not keep


# -- 11. two databases, one output folder ----------------------------------------------------------

def test_a_second_database_refuses_an_output_folder_owned_by_another(stt, tmp_path):
    tones(tmp_path / "in", 2)
    first = run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(tmp_path / "in"))
    assert first.returncode == 0, first.stderr
    other = [sys.executable, TRANSCRIBE, "--db", str(tmp_path / "other.db"), "--output-dir", str(tmp_path / "out"),
             "--quiet", "--input", str(tmp_path / "in")]
    refused = subprocess.run(other, capture_output=True, text=True, timeout=120, env=script_env(**env_for(stt)))
    assert refused.returncode == 2 and "--adopt-output-dir" in refused.stderr, refused.stderr
    assert stt.server.count() == 2
    adopted = subprocess.run([*other, "--adopt-output-dir"], capture_output=True, text=True, timeout=120,
                             env=script_env(**env_for(stt)))
    assert adopted.returncode == 0, adopted.stderr
    again = run(TRANSCRIBE, tmp_path, env_for(stt), "--retry-failed")
    assert again.returncode == 2 and "--adopt-output-dir" in again.stderr  # the folder now belongs to other.db


# -- 12. a read-only database -----------------------------------------------------------------------

def test_reading_tools_work_on_a_read_only_database(tmp_path, mount_tmpfs):
    make_archive(tmp_path, n_german=2, n_english=0)
    ro = mount_tmpfs(tmp_path / "ro", "size=8m")
    shutil.copy(tmp_path / "jobs.db", ro / "jobs.db")
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    db = str(ro / "jobs.db")
    # (command, exit code): the check tool reports this archive's media as missing (they are made up), 1
    commands = [([STATUS, "--db", db], 0), ([STATUS, "--db", db, "--json", "--files"], 0),
                ([CHECK, "--db", db, "--output-dir", str(tmp_path / "out")], 1),
                ([TRANSCRIBE, "--db", db, "--dry-run"], 0),
                ([TRANSLATE, "--db", db, "--dry-run", "--language", "en"], 0)]
    with FakeDeepL() as fake:
        env = script_env(**fake.env(), OPENAI_API_KEY="sk-test-openai-0000")
        for args, code in commands:
            result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env)
            assert (result.returncode, result.stderr) == (code, ""), args


def test_a_read_only_database_older_than_the_code_is_refused_clearly(tmp_path, mount_tmpfs):
    make_archive(tmp_path, n_german=1, n_english=0)
    ro = mount_tmpfs(tmp_path / "ro", "size=8m")
    shutil.copy(tmp_path / "jobs.db", ro / "jobs.db")
    conn = sqlite3.connect(ro / "jobs.db")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    result = subprocess.run([sys.executable, STATUS, "--db", str(ro / "jobs.db")], capture_output=True, text=True,
                            timeout=60, env=script_env())
    assert result.returncode == 2 and "older" in result.stderr and "read-only" in result.stderr, result.stderr


# -- 13. translation started beside its transcription ------------------------------------------------

def test_translation_with_transcripts_still_to_come_says_work_is_left(stt, tmp_path):
    tones(tmp_path / "in", 3)
    assert run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(tmp_path / "in"), "--dry-run").returncode == 0
    with FakeDeepL() as fake:
        result = run(TRANSLATE, tmp_path, fake.env(), "--language", "he", timeout=60)
    assert result.returncode == 3, result.stderr
    assert "transcript" in result.stderr


@pytest.mark.timeout(240)
def test_translation_started_in_the_same_moment_as_transcription(stt, tmp_path):
    tones(tmp_path / "in", 6)
    assert run(TRANSCRIBE, tmp_path, env_for(stt), "--input", str(tmp_path / "in"), "--dry-run").returncode == 0
    stt.server.latency = 0.3
    with FakeDeepL() as deepl:
        env = script_env(**env_for(stt), **deepl.env(), VERBATIM_TRANSLATION_PROVIDER="deepl")
        translate = subprocess.Popen(command(TRANSLATE, tmp_path, "--language", "he"), env=env,
                                     stderr=subprocess.PIPE, text=True)
        transcribe = subprocess.Popen(command(TRANSCRIBE, tmp_path, "--workers", "2"), env=env,
                                      stderr=subprocess.PIPE, text=True)
        errors = [translate.communicate(timeout=180)[1], transcribe.communicate(timeout=180)[1]]
    assert transcribe.returncode == 0, errors
    left = db_rows(tmp_path, "SELECT COUNT(*) FROM jobs WHERE stage='translation' AND language='he'"
                   " AND status != 'completed'")[0][0]
    # Either it followed the transcription to the end, or it said that work is left: never 0 with work left.
    assert (translate.returncode, left) == (0, 0) or (translate.returncode == 3 and left), errors
