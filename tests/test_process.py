"""tools/process.py: register, transcribe and translate in one run, against fake providers on 127.0.0.1."""

import json
import subprocess
import sys

from benchmarks import mediagen
from tests.conftest import ROOT, script_env
from tests.fake_stt import FakeSTT, env_for
from benchmarks.fake_translate import FakeDeepL
from benchmarks.fakeserver import Fault, FakeServer

TOOL = str(ROOT / "tools/process.py")


def run(tmp_path, env, *args):
    return subprocess.run([sys.executable, TOOL, "--db", str(tmp_path / "jobs.db"), "--output-dir",
                           str(tmp_path / "out"), "--quiet", *args], capture_output=True, text=True, env=env,
                          timeout=180, cwd=tmp_path)


def test_one_command_registers_transcribes_and_translates(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for n, freq in enumerate((440, 550, 660, 770)):
        mediagen.make_tone(inputs / f"interview-{n}.wav", freq=freq, seconds=1.5)
    with FakeServer() as server, FakeDeepL() as deepl:
        # Each file's first request fails (HTTP 500) and waits 2 s before its retry: for a while no
        # transcription is in progress, and the translations must follow the run, not leave.
        refused = []
        server.fault = lambda request: (refused.append(1) or Fault("status", 500, {"error": {"message": "busy"}},
                                                                   {"Retry-After": "2"})
                                        if len(refused) < 4 else None)
        env = script_env(**env_for(FakeSTT(server), ELEVENLABS_API_KEY=None), **deepl.env())
        result = run(tmp_path, env, "--input", str(inputs), "--language", "he", "--workers", "4",
                     "--translation-provider", "deepl", "--json")
        assert result.returncode == 0, result.stderr
        runs = {(r["stage"], r["language"]): r for r in json.loads(result.stdout)["runs"]}
        assert set(runs) == {("transcription", ""), ("translation", "he")}
        assert all(r["completed"] == 4 and r["failed_total"] == 0 and r["remaining"] == 0 for r in runs.values())
        transcribed = len(server.requests)
        assert transcribed == 8 and runs[("transcription", "")]["retried"] == 4

        status = json.loads(subprocess.run([sys.executable, str(ROOT / "tools/status.py"), "--db",
                                            str(tmp_path / "jobs.db"), "--output-dir", str(tmp_path / "out"),
                                            "--files", "--json"], capture_output=True,
                                           text=True, env=script_env(), check=True).stdout)
        for item in status["items"]:
            assert item["transcription"]["status"] == "completed"
            he = item["translation"]["he"]
            assert he["status"] == "completed" and open(he["outputs"]["srt"], encoding="utf-8").read()

        again = run(tmp_path, env, "--input", str(inputs), "--language", "he",
                    "--translation-provider", "deepl")
        assert again.returncode == 0, again.stderr
        assert "nothing to do" in again.stderr and len(server.requests) == transcribed


def test_a_language_without_a_provider_is_refused_at_start(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    mediagen.make_tone(inputs / "a.wav", freq=440, seconds=1.0)
    with FakeServer() as server:
        env = script_env(**env_for(FakeSTT(server), OPENAI_API_KEY=None))  # ElevenLabs for speech only
        result = run(tmp_path, env, "--input", str(inputs), "--language", "he")
        assert result.returncode == 2 and "no translation provider configured for he" in result.stderr
        assert len(server.requests) == 0
