"""The repair tools: check_missing_transcripts, fix_transcript_status, retry_failed_transcriptions.

Databases are put into each broken state directly with DatabaseManager and real output files
written by the pipeline's own writers, then damaged on disk.
"""

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

import db_manager as dbm
from db_manager import (COMPLETED, FAILED, IN_PROGRESS, NOT_STARTED, TRANSCRIPTION, TRANSLATION, MediaRecord,
                        Outcome, make_owner)
from pipeline import config
from pipeline.outputs import as_recorded, atomic_write, resolve_recorded, safe_join
from tests.conftest import ROOT, script_env
from tools import adopt_edits as adopt_tool
from tools import check_missing_transcripts as check_tool
from tools import fix_transcript_status as fix_tool
from tools import retry_failed_transcriptions as retry_tool
from tools import status as status_tool
from transcription import Segment, Transcript, write_transcript_outputs
from translation import Translation, Unit, write_translation_outputs

HOLDER = """
import sys, time
from db_manager import DatabaseManager, make_owner
db = DatabaseManager(sys.argv[1])
job = db.claim(make_owner(), "transcription", file_ids=[sys.argv[2]])[0]
print(job.id, flush=True)
if sys.argv[3] == "hold":
    time.sleep(120)
"""


@pytest.fixture(autouse=True)
def no_logging_setup(monkeypatch):
    # In-process tool runs must not replace pytest's log handlers with one bound to a captured stderr.
    monkeypatch.setattr(config, "setup_logging", lambda *args, **kwargs: None)


class Archive:
    """Media registered in a job database, with outputs written by the pipeline's writers."""

    def __init__(self, db, tmp_path):
        self.db = db
        self.db_path = db.path
        self.root = str(tmp_path / "out")
        self.media = tmp_path / "media"
        self.media.mkdir()
        self.owner = make_owner(host="another-machine")  # its lease alone decides

    def add(self, name: str) -> str:
        path = self.media / f"{name}.wav"
        path.write_bytes(f"audio of {name}".encode())
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        stat = path.stat()
        self.db.register_files([MediaRecord(str(path), sha, stat.st_size, stat.st_mtime_ns, "audio")], ["he"])
        return sha[:16]

    def folder(self, file_id: str):
        return safe_join(self.root, self.db.jobs(file_id=file_id)[0]["folder"])

    def path(self, file_id: str, name: str):
        return self.folder(file_id) / name

    @staticmethod
    def transcript(file_id: str) -> Transcript:
        segments = [Segment(0.0, 1.5, f"Interview {file_id[:4]} begins.", "speaker_0"),
                    Segment(1.5, 3.25, "We were born in Vienna.", "speaker_1")]
        return Transcript(text=" ".join(s.text for s in segments), segments=segments, language="en",
                          duration=3.25, provider="fake", model="fake-stt", usage={}, has_timestamps=True,
                          raw_responses=[{"fake": file_id}])

    @staticmethod
    def translation(language: str = "he", units: int = 2) -> Translation:
        texts = ["הראיון מתחיל.", "נולדנו בווינה."][:units]
        timed = [Unit(texts[0], 0.0, 1.5, "speaker_0"), Unit(texts[1] if units > 1 else "", 1.5, 3.25, "speaker_1")]
        return Translation(units=timed[:units], text="\n".join(texts), source_language="en", language=language,
                           provider="fake", model=None, usage={}, cost=0.0, has_timestamps=True, kept_units=0)

    def write_transcript(self, file_id: str) -> dict:
        return as_recorded(write_transcript_outputs(self.transcript(file_id), self.folder(file_id), root=self.root))

    def write_translation(self, file_id: str, translation: Translation | None = None) -> dict:
        """As a pipeline run writes it: from the transcript json now in the folder."""
        translation = translation or self.translation()
        translation.source_sha256 = self.transcript_sha(file_id)
        written = write_translation_outputs(translation, self.folder(file_id), root=self.root)
        return as_recorded(written)

    def transcript_sha(self, file_id: str) -> str | None:
        try:
            return hashlib.sha256(self.path(file_id, "transcript.json").read_bytes()).hexdigest()
        except FileNotFoundError:
            return None

    def claim(self, file_id: str, stage: str = TRANSCRIPTION, owner: str | None = None, **kwargs):
        language = "he" if stage == TRANSLATION else ""
        return self.db.claim(owner or self.owner, stage, language, file_ids=[file_id], **kwargs)[0]

    def transcribe(self, file_id: str, outputs: dict | None = None) -> None:
        job = self.claim(file_id)
        self.db.complete(job, Outcome(outputs or self.write_transcript(file_id)))

    def translate(self, file_id: str) -> None:
        job = self.claim(file_id, TRANSLATION)
        self.db.complete(job, Outcome(self.write_translation(file_id), source_sha256=self.transcript_sha(file_id)))

    def fail(self, file_id: str, stage: str = TRANSCRIPTION, error_class: str = "bad_request") -> None:
        self.db.fail(self.claim(file_id, stage), error_class, f"{error_class}: rejected", retryable=False)

    def status(self, file_id: str, stage: str = TRANSCRIPTION) -> str:
        return self.job(file_id, stage)["status"]

    def job(self, file_id: str, stage: str = TRANSCRIPTION):
        language = "he" if stage == TRANSLATION else ""
        return self.db.jobs(file_id=file_id, stage=stage, language=language)[0]

    def args(self, *extra) -> list[str]:
        return ["--db", self.db_path, "--output-dir", self.root, *extra]

    def snapshot(self):
        tables = [self.db.query(f"SELECT * FROM {table} ORDER BY 1") for table in ("jobs", "events", "media_files")]
        files = sorted(os.path.join(d, f) for d, _dirs, names in os.walk(self.root) for f in names)
        return [[tuple(row) for row in rows] for rows in tables], files


@pytest.fixture
def archive(db, tmp_path):
    return Archive(db, tmp_path)


def run_tool(module, archive: Archive, *extra, capsys) -> tuple[int, str]:
    code = module.main(archive.args(*extra))
    return code, capsys.readouterr().out


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "alter":  # same size, one word changed: only the hash can tell
        path.write_bytes(data.replace(b"Vienna", b"Vilnius"[:6]))
    elif how == "garble":  # same size, not the format any more
        path.write_bytes(b"x" * len(data))
    else:
        raise ValueError(how)


def write_temp(folder, age_seconds: float):
    temp = folder / f".transcript.txt.{os.urandom(16).hex()}.tmp"
    temp.write_bytes(b"partial")
    stamp = time.time() - age_seconds
    os.utime(temp, (stamp, stamp))
    return temp


# -- check_missing_transcripts ------------------------------------------------------------------------
def test_check_passes_on_a_sound_archive(archive, capsys):
    for name in ("a", "b"):
        file_id = archive.add(name)
        archive.transcribe(file_id)
        archive.translate(file_id)
    code, out = run_tool(check_tool, archive, "--json", capsys=capsys)
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["problems"] == []
    assert report["checked"] == {"completed_jobs": 4, "outputs": 18, "media_files": 2}


def test_check_finds_exactly_the_damaged_outputs(archive, capsys):
    ids = {name: archive.add(name) for name in "abcdefgh"}
    for file_id in ids.values():
        if file_id != ids["e"]:
            archive.transcribe(file_id)
    # e: completed with a recorded vtt that was never well formed (its hash matches the record)
    outputs = archive.write_transcript(ids["e"])
    outputs["vtt"] = as_recorded({"vtt": atomic_write(archive.path(ids["e"], "transcript.vtt"),
                                                      "00:01 --> not a cue\n", root=archive.root)})["vtt"]
    archive.transcribe(ids["e"], outputs)
    archive.translate(ids["a"])
    archive.translate(ids["g"])

    damage(archive.path(ids["a"], "transcript.txt"), "delete")
    damage(archive.path(ids["b"], "transcript.json"), "truncate")
    damage(archive.path(ids["c"], "transcript.srt"), "alter")
    damage(archive.path(ids["d"], "transcript.raw.json.gz"), "garble")
    damage(archive.path(ids["g"], "translation.he.srt"), "delete")
    (archive.media / "f.wav").unlink()
    (safe_join(archive.root, "0123456789abcdef-gone")).mkdir()

    code, out = run_tool(check_tool, archive, "--json", capsys=capsys)
    report = json.loads(out)
    found = {(p["kind"], p["file_id"], p["stage"], p["format"]) for p in report["problems"]}
    assert code == 1 and not report["ok"]
    assert found == {
        ("missing", ids["a"], TRANSCRIPTION, "txt"),
        ("truncated", ids["b"], TRANSCRIPTION, "json"),
        ("edited", ids["c"], TRANSCRIPTION, "srt"),  # a hand correction, still well formed
        ("changed", ids["d"], TRANSCRIPTION, "raw"),
        ("unparsable", ids["e"], TRANSCRIPTION, "vtt"),
        ("missing", ids["g"], TRANSLATION, "srt"),
        ("media_missing", ids["f"], None, None),
        ("orphan_folder", None, None, None),
    }
    by_file = {p["file_id"]: p for p in report["problems"]}
    assert by_file[ids["a"]]["media_path"].endswith("a.wav")
    assert by_file[ids["a"]]["output"] == str(archive.path(ids["a"], "transcript.txt"))
    assert "tools/adopt_edits.py --apply" in by_file[ids["c"]]["detail"]
    assert "unparsable: BadGzipFile" in by_file[ids["d"]]["detail"]
    assert by_file[None]["output"].endswith("0123456789abcdef-gone")

    code, out = run_tool(check_tool, archive, "--language", "he", capsys=capsys)
    assert code == 1
    assert out.splitlines()[0].startswith("missing") and ids["g"] in out and "translation.he.srt" in out
    assert len(out.splitlines()) == 2 and out.splitlines()[-1].endswith("1 problem(s)")


def test_check_option_errors_are_usage_errors(archive):
    with pytest.raises(config.ConfigError):
        check_tool.main(archive.args("--stage", "transcription", "--language", "he"))
    with pytest.raises(config.ConfigError):
        check_tool.main(archive.args("--language", "xx"))


@pytest.mark.parametrize("tool", ["check_missing_transcripts.py", "fix_transcript_status.py",
                                  "retry_failed_transcriptions.py"])
def test_tools_refuse_a_missing_database(tool, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--db", str(tmp_path / "none.db")],
                            capture_output=True, text=True, env=script_env(), cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "no database" in result.stderr
    assert not (tmp_path / "none.db").exists()


# -- fix_transcript_status ----------------------------------------------------------------------------
def broken_archive(archive: Archive, tmp_path) -> dict:
    """One file in each state the fix tool repairs, plus one it must leave alone."""
    ids = {name: archive.add(name) for name in ("sound", "lost_txt", "bad_json", "edited", "orphan", "failed",
                                                "alien", "dead", "expired")}
    for name in ("sound", "lost_txt", "bad_json", "edited"):
        archive.transcribe(ids[name])
        archive.translate(ids[name])
    damage(archive.path(ids["lost_txt"], "transcript.txt"), "delete")
    damage(archive.path(ids["bad_json"], "transcript.json"), "truncate")
    damage(archive.path(ids["edited"], "transcript.srt"), "alter")
    # orphan: never claimed, but a killed run wrote the full transcript and translation set
    archive.write_transcript(ids["orphan"])
    archive.write_translation(ids["orphan"])
    # failed: failed after its outputs were written (transcript), translation failed too
    archive.write_transcript(ids["failed"])
    archive.fail(ids["failed"])
    # alien: transcript completed, but the he folder holds a translation of another text
    archive.transcribe(ids["alien"])
    archive.write_translation(ids["alien"], archive.translation(units=1))
    # dead: held by a process that no longer exists; expired: lease ran out
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host, boot, namespace, *_ = dbm.make_owner().split(":")
    archive.claim(ids["dead"], owner=":".join((host, boot, namespace, str(gone.pid), "1", "gone")))
    archive.claim(ids["expired"], lease_seconds=-1)
    folder = archive.folder(ids["sound"])
    ids["old_temp"] = write_temp(folder, 7200)
    ids["new_temp"] = write_temp(folder, 10)
    return ids


def test_fix_dry_run_lists_every_repair_and_changes_nothing(archive, tmp_path, capsys):
    ids = broken_archive(archive, tmp_path)
    before = archive.snapshot()
    code, out = run_tool(fix_tool, archive, capsys=capsys)
    assert code == 0 and archive.snapshot() == before
    lines = out.splitlines()
    assert lines[-1] == "would change 10"
    expected = [("reclaim", ids["dead"], "owner process is gone"), ("reclaim", ids["expired"], "lease expired"),
                ("reset", ids["lost_txt"], "txt missing"), ("reset", ids["bad_json"], "json truncated"),
                ("adopt", ids["orphan"], "transcription"),
                ("adopt", ids["failed"], "failed -> completed"), ("adopt", ids["orphan"], "translation he")]
    for action, file_id, text in expected:
        assert any(line.startswith(action) and file_id in line and text in line for line in lines), (action, text)
    assert not [line for line in lines if ids["edited"] in line]  # a hand correction is no damage
    # translations of the two broken transcripts: their source is gone once those are reset
    stale = [line for line in lines if "its transcript is not_started" in line]
    assert {ids[n] for n in ("lost_txt", "bad_json")} == {line.split()[3] for line in stale}
    assert [line for line in lines if line.startswith("sweep")] == [
        f"sweep    {ids['old_temp']}  delete: orphan temporary file older than 3600 s"]


def test_fix_apply_repairs_each_state_then_check_passes(archive, tmp_path, capsys):
    ids = broken_archive(archive, tmp_path)
    code, out = run_tool(fix_tool, archive, "--apply", capsys=capsys)
    assert code == 0 and out.splitlines()[-1] == "changed 10" and "skipped" not in out

    assert archive.status(ids["edited"]) == COMPLETED and archive.status(ids["edited"], TRANSLATION) == COMPLETED
    for name in ("lost_txt", "bad_json"):
        assert archive.status(ids[name]) == NOT_STARTED and archive.job(ids[name])["outputs"] == "{}"
        assert archive.status(ids[name], TRANSLATION) == NOT_STARTED
    for name in ("dead", "expired"):
        job = archive.job(ids[name])
        assert job["status"] == NOT_STARTED and job["lease_owner"] is None and job["attempts"] == 0
    for name, stage in (("orphan", TRANSCRIPTION), ("orphan", TRANSLATION), ("failed", TRANSCRIPTION)):
        job = archive.job(ids[name], stage)
        assert job["status"] == COMPLETED and job["note"] == fix_tool.ADOPTED_NOTE
        for info in json.loads(job["outputs"]).values():
            assert not os.path.isabs(info["path"])  # recorded relative to the output root, as runs record
            data = resolve_recorded(archive.root, info["path"]).read_bytes()
            assert info["size"] == len(data) and info["sha256"] == hashlib.sha256(data).hexdigest()
    assert set(json.loads(archive.job(ids["orphan"])["outputs"])) == {"txt", "json", "srt", "vtt", "raw"}
    assert archive.status(ids["alien"], TRANSLATION) == NOT_STARTED   # not adopted: not this transcript's
    assert archive.status(ids["sound"]) == COMPLETED and archive.status(ids["sound"], TRANSLATION) == COMPLETED
    assert not ids["old_temp"].exists() and ids["new_temp"].exists()
    events = [(e["from_status"], e["to_status"], e["owner"]) for e in archive.db.events(file_id=ids["failed"])]
    assert events[-1] == (FAILED, COMPLETED, "tool:fix_transcript_status.py")

    code, out = run_tool(check_tool, archive, "--json", capsys=capsys)
    assert code == 1 and {(p["kind"], p["file_id"]) for p in json.loads(out)["problems"]} == {("edited", ids["edited"])}
    code, out = run_tool(adopt_tool, archive, "--apply", capsys=capsys)  # the correction becomes the record
    assert code == 0 and "adopted 1" in out and "1 translation(s) are now stale" in out
    code, out = run_tool(check_tool, archive, "--json", capsys=capsys)
    assert code == 1 and {(p["kind"], p["file_id"]) for p in json.loads(out)["problems"]} == {("stale", ids["edited"])}
    code, out = run_tool(status_tool, archive, "--json", capsys=capsys)
    assert json.loads(out)["stale"] == {"he": 1}
    code, out = run_tool(status_tool, archive, capsys=capsys)
    assert "Hebrew translations:" in out and "(stale 1: transcript changed since)" in out
    code, out = run_tool(fix_tool, archive, capsys=capsys)
    assert code == 0 and out.strip() == "would change 0"


def test_fix_never_touches_jobs_that_live_owners_hold(archive, tmp_path):
    ids = {name: archive.add(name) for name in ("mine", "theirs", "dead")}
    archive.claim(ids["mine"])                       # held by this (live) test process
    archive.write_transcript(ids["mine"])            # outputs already written: still not adoptable
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, archive.db_path, ids["theirs"], "hold"],
                              stdout=subprocess.PIPE, text=True, env=script_env())
    try:
        holder.stdout.readline()
        subprocess.run([sys.executable, "-c", HOLDER, archive.db_path, ids["dead"], "exit"],
                       check=True, capture_output=True, timeout=60, env=script_env())
        live = {name: tuple(archive.job(ids[name])) for name in ("mine", "theirs")}
        live_events = {name: len(archive.db.events(file_id=ids[name])) for name in live}
        result = subprocess.run([sys.executable, str(ROOT / "tools/fix_transcript_status.py"), *archive.args("--apply")],
                                capture_output=True, text=True, env=script_env(), timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1] == "changed 1" and ids["dead"] in result.stdout
        assert "left alone: 2 in-progress job(s) held by live runs" in result.stderr
        for name, row in live.items():
            assert tuple(archive.job(ids[name])) == row
            assert len(archive.db.events(file_id=ids[name])) == live_events[name]
        assert archive.status(ids["dead"]) == NOT_STARTED
    finally:
        holder.kill()
        holder.wait()


def test_fix_rechecks_each_change_when_making_it(archive, capsys):
    ids = {name: archive.add(name) for name in ("adoptable", "broken")}
    archive.write_transcript(ids["adoptable"])
    archive.transcribe(ids["broken"])
    archive.translate(ids["broken"])
    srt = archive.path(ids["broken"], "transcript.srt")
    original = srt.read_bytes()
    damage(srt, "delete")
    planner = fix_tool.Planner(archive.db, archive.root)
    changes = planner.plan(3600)
    assert [c.action for c in changes] == ["reset", "adopt", "reset"]   # broken, adoptable, broken's translation
    # Between plan and apply: a runner claims the adoptable job, and the srt comes back.
    archive.claim(ids["adoptable"])
    srt.write_bytes(original)
    applied = fix_tool.apply_changes(planner, changes)
    assert [c.done for c in applied] == [False, False, False]
    assert archive.status(ids["adoptable"]) == IN_PROGRESS and archive.status(ids["broken"]) == COMPLETED
    fix_tool.report(applied, True, False)
    out = capsys.readouterr().out
    assert out.count("skipped (no longer applies)") == 3 and out.splitlines()[-1] == "changed 0"


def test_adoption_needs_a_complete_consistent_set_that_belongs_to_the_job(archive):
    file_id = archive.add("a")
    folder = archive.folder(file_id)
    job = fix_tool.JobState.from_row(archive.job(file_id))
    archive.write_transcript(file_id)
    outputs, why = fix_tool.valid_output_set(job, folder, None)
    assert why == "" and set(outputs) == {"txt", "json", "srt", "vtt", "raw"}

    other = Archive.transcript("ffff0000").to_txt()
    atomic_write(folder / "transcript.txt", other, root=archive.root)
    assert fix_tool.valid_output_set(job, folder, None) == (None, "transcript.txt does not agree with transcript.json")
    archive.write_transcript(file_id)
    (folder / "transcript.raw.json.gz").unlink()
    assert fix_tool.valid_output_set(job, folder, None)[1].startswith("transcript.raw.json.gz")

    source = json.loads(Archive.transcript(file_id).to_json())
    he_job = fix_tool.JobState.from_row(archive.job(file_id, TRANSLATION))
    archive.write_translation(file_id)
    assert fix_tool.valid_output_set(he_job, folder, source)[1] == ""
    shifted = dict(source, segments=[dict(s, start=s["start"] + 1) for s in source["segments"]])
    assert "timings differ" in fix_tool.valid_output_set(he_job, folder, shifted)[1]
    atomic_write(folder / "translation.he.json",
                 (folder / "translation.he.json").read_text().replace('"language": "he"', '"language": "en"'),
                 root=archive.root)
    assert "its language is 'en'" in fix_tool.valid_output_set(he_job, folder, source)[1]


# -- retry_failed_transcriptions ------------------------------------------------------------------------
def test_retry_dry_run_lists_what_it_would_reset_and_changes_nothing(archive, capsys):
    ids = {name: archive.add(name) for name in "abcd"}
    archive.fail(ids["a"], error_class="server_error")
    archive.fail(ids["b"], error_class="bad_request")
    archive.fail(ids["c"], error_class="server_error")
    archive.transcribe(ids["d"])
    archive.fail(ids["d"], TRANSLATION, error_class="validation")
    before = archive.snapshot()

    code, out = run_tool(retry_tool, archive, "--dry-run", "--error-class", "server_error", capsys=capsys)
    assert code == 0 and archive.snapshot() == before
    assert out.splitlines()[-1] == "would reset 2 failed transcription job(s) to not_started and retry them"
    assert ids["a"] in out and ids["c"] in out and ids["b"] not in out

    code, out = run_tool(retry_tool, archive, "--dry-run", "--limit", "1", "--json", capsys=capsys)
    assert json.loads(out)["would_reset"] == 1 and json.loads(out)["jobs"][0]["file_id"] == ids["a"]

    code, out = run_tool(retry_tool, archive, "--dry-run", "--stage", "translation", "--language", "he",
                         capsys=capsys)
    assert ids["d"] in out and "[validation]" in out and out.splitlines()[-1].startswith("would reset 1 failed translation he")
    assert archive.snapshot() == before


def test_retry_options_are_checked(archive):
    for bad in (["--stage", "translation"], ["--language", "he"], ["--stage", "translation", "--language", "xx"]):
        with pytest.raises(config.ConfigError):
            retry_tool.main(archive.args("--dry-run", *bad))


def test_a_retry_scope_claims_waits_for_and_counts_only_the_retried_jobs(archive):
    ids = {name: archive.add(name) for name in "abc"}
    archive.fail(ids["a"])
    archive.fail(ids["b"])
    assert sorted(archive.db.reset_failed(TRANSCRIPTION)) == sorted([ids["a"], ids["b"]])
    scope = [ids["a"]]
    assert archive.db.pending(TRANSCRIPTION, file_ids=scope) == (1, 0)
    assert archive.db.counts(file_ids=scope)[(TRANSCRIPTION, "")][NOT_STARTED] == 1
    claimed = archive.db.claim(archive.owner, TRANSCRIPTION, limit=10, file_ids=scope)
    assert [job.file_id for job in claimed] == [ids["a"]]
    assert archive.db.pending(TRANSCRIPTION, file_ids=scope)[0] == 0 and archive.db.pending(TRANSCRIPTION)[0] == 2


def test_a_retry_refuses_an_output_folder_another_database_owns_as_the_scripts_do(archive, tmp_path, monkeypatch):
    """Drift check: the retry tool prepares the output folder as the scripts do (writable, this
    database's), before any job is reset or any provider asked."""
    from pipeline.archive import prepare_output_root

    ids = {name: archive.add(name) for name in "ab"}
    archive.transcribe(ids["a"])
    archive.fail(ids["a"], TRANSLATION, error_class="validation")
    other = dbm.DatabaseManager(str(tmp_path / "other.db"))
    try:
        prepare_output_root(other, archive.root)
    finally:
        other.close_all()
    monkeypatch.setenv("DEEPL_API_KEY", "deepl-test-a1b2c3:fx")
    monkeypatch.setattr(retry_tool, "run_plans", lambda db, plans, stop: [])
    before = archive.snapshot()
    with pytest.raises(config.ConfigError, match="belongs to another job database"):
        retry_tool.main(archive.args("--stage", "translation", "--language", "he"))
    assert archive.snapshot() == before


def test_retry_runs_failed_files_again_once_the_api_heals(tmp_path):
    pytest.importorskip("tests.fake_stt")
    from tests.fake_stt import FakeSTT, analyse, decode_pcm, env_for
    from benchmarks.fakeserver import Fault, FakeServer
    from benchmarks.mediagen import make_tone

    media = tmp_path / "media"
    media.mkdir()
    for freq in (440, 660, 880):
        make_tone(media / f"tone{freq}.wav", freq=freq, seconds=1.5)
    refused = {"tone660": 400, "tone880": 422}   # bad_request and unsupported_media

    def sick(request):
        _fields, files = request.form()
        text = " ".join(run.text for run in analyse(decode_pcm(files["file"][1])))
        for word, status in refused.items():
            if word in text:
                return Fault("status", status, {"error": {"message": "refused", "type": "invalid_request_error"}})
        return None

    db_path, out = str(tmp_path / "jobs.db"), str(tmp_path / "out")
    with FakeServer() as server:
        stt = FakeSTT(server)
        env = script_env(**env_for(stt, ELEVENLABS_API_KEY=None))

        def run(script, *args):
            return subprocess.run([sys.executable, str(ROOT / script), "--db", db_path, "--output-dir", out,
                                   *args], capture_output=True, text=True, env=env, timeout=120)

        server.fault = sick
        first = run("parallel_transcription.py", "--input", str(media), "--workers", "3", "--quiet", "--language", "DE")
        assert first.returncode == 1, first.stderr
        assert {u.fields.get("language") for u in stt.uploads} == {"de"}  # the code, not as typed
        make_tone(media / "later.wav", freq=550, seconds=1.0)   # queued work the retry must not start
        assert run("tools/add_media.py", str(media / "later.wav")).returncode == 0

        server.fault = None
        sent = server.count()
        uploaded = len(stt.uploads)
        retry = run("tools/retry_failed_transcriptions.py", "--workers", "2", "--error-class", "bad_request",
                    "--quiet", "--json", "--spoken-language", "DE")
        assert retry.returncode == 0, retry.stderr
        assert [u.fields.get("language") for u in stt.uploads[uploaded:]] == ["de"]
        summary = json.loads(retry.stdout)["runs"][0]
        assert (summary["completed"], summary["failed_total"], summary["remaining"]) == (1, 0, 0)
        assert server.count() - sent == 1

    manager = dbm.DatabaseManager(db_path)
    try:
        rows = {os.path.basename(r["path_display"]): r for r in manager.jobs(stage=TRANSCRIPTION)}
        assert rows["tone660.wav"]["status"] == COMPLETED and rows["tone660.wav"]["attempts"] == 1
        history = [(e["from_status"], e["to_status"]) for e in manager.events(job_id=rows["tone660.wav"]["id"])]
        assert (IN_PROGRESS, FAILED) in history and (FAILED, NOT_STARTED) in history
        assert rows["tone880.wav"]["status"] == FAILED and rows["later.wav"]["status"] == NOT_STARTED
    finally:
        manager.close_all()
    check = subprocess.run([sys.executable, str(ROOT / "tools/check_missing_transcripts.py"), "--db", db_path,
                            "--output-dir", out], capture_output=True, text=True, env=script_env(), timeout=60)
    assert check.returncode == 0, check.stdout


# -- hand corrections ------------------------------------------------------------------------------------
def test_an_edit_that_cannot_be_read_back_changes_nothing(archive, capsys):
    file_id = archive.add("a")
    archive.transcribe(file_id)
    txt = archive.path(file_id, "transcript.txt")
    txt.write_text(txt.read_text() + "\n\nspeaker_0: a third turn the audio does not have\n")
    before = archive.snapshot()
    code, out = run_tool(adopt_tool, archive, "--apply", capsys=capsys)
    assert code == 1 and "speaker turns" in out and "edit the .srt" in out
    assert archive.snapshot() == before


def test_a_txt_edit_renames_a_speaker_and_keeps_the_timings(archive, capsys):
    file_id = archive.add("a")
    archive.transcribe(file_id)
    txt = archive.path(file_id, "transcript.txt")
    txt.write_text(txt.read_text().replace("speaker_1: We were born in Vienna.", "Interviewee: We were born in Wien."))
    code, out = run_tool(adopt_tool, archive, "--apply", capsys=capsys)
    assert code == 0 and "adopted 1" in out
    doc = json.loads(archive.path(file_id, "transcript.json").read_text())
    assert [(s["start"], s["end"], s["speaker"], s["text"]) for s in doc["segments"]][1] == (
        1.5, 3.25, "Interviewee", "We were born in Wien.")
    assert "We were born in Wien." in archive.path(file_id, "transcript.srt").read_text()
    assert run_tool(check_tool, archive, capsys=capsys)[0] == 0  # the record and the files agree again
    events = archive.db.events(file_id=file_id)
    assert "hand correction adopted from transcript.txt" in events[-1]["error_message"]


def test_fix_never_adopts_a_translation_of_another_version_of_the_transcript(archive, capsys):
    file_id = archive.add("a")
    archive.transcribe(file_id)
    archive.write_translation(file_id)             # made from this transcript ...
    transcript = Archive.transcript(file_id)
    transcript.segments[1].text = "We were born in Graz."
    outputs = as_recorded(write_transcript_outputs(transcript, archive.folder(file_id), root=archive.root))
    archive.db.record_edit(archive.job(file_id)["id"], outputs, json.loads(archive.job(file_id)["outputs"]),
                           "transcript redone")   # ... which then changed: same cues, other words
    code, out = run_tool(fix_tool, archive, capsys=capsys)
    assert code == 0 and out.strip() == "would change 0"
    assert archive.status(file_id, TRANSLATION) == NOT_STARTED


def test_a_translation_corrected_by_hand_is_adopted_not_overwritten(archive, capsys):
    file_id = archive.add("a")
    archive.transcribe(file_id)
    archive.translate(file_id)
    srt = archive.path(file_id, "translation.he.srt")
    corrected = srt.read_text().replace("נולדנו בווינה.", "נולדנו בווינה, ב-1930.")
    srt.write_text(corrected)
    code, out = run_tool(check_tool, archive, "--json", capsys=capsys)
    assert code == 1 and [(p["kind"], p["format"]) for p in json.loads(out)["problems"]] == [("edited", "srt")]
    code, out = run_tool(adopt_tool, archive, "--apply", capsys=capsys)
    assert code == 0 and "adopted 1" in out
    doc = json.loads(archive.path(file_id, "translation.he.json").read_text())
    assert doc["segments"][1]["text"] == "נולדנו בווינה, ב-1930." and doc["segments"][1]["start"] == 1.5
    assert "נולדנו בווינה, ב-1930." in archive.path(file_id, "translation.he.txt").read_text()
    assert [p.read_text() for p in archive.folder(file_id).glob("translation.he.srt.edited-*")] == [corrected]
    assert run_tool(check_tool, archive, capsys=capsys)[0] == 0  # the record and the files agree
    assert archive.db.stale_translations() == []  # its transcript did not change: nothing to redo
