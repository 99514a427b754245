"""transcription.py against fake providers on 127.0.0.1: the real openai SDK and requests on the wire."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import transcription as T
from benchmarks import mediagen
from benchmarks.fakeserver import FakeServer, Fault
from pipeline.audio import Chunk
from pipeline.config import ConfigError
from pipeline.errors import AccountError, PermanentError, RateLimitError, RetryableError
from pipeline.subtitles import parse_srt, parse_vtt
from tests.fake_stt import ELEVENLABS_PATH, OPENAI_PATH, FakeSTT, env_for

SCRIPT = str(Path(__file__).resolve().parent.parent / "transcription.py")
TONE_TEXTS = ["tone440 tone440 tone440.", "tone880 tone880 tone880.", "tone660 tone660 tone660."]
TONE_TIMES = [(0.0, 3.0), (4.0, 7.0), (8.0, 11.0)]
CANARY = "sk-test-CANARY-7f3a9c1e5b"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    mediagen.make_tones_with_gaps(folder / "tones.wav", [(440, 3), (880, 3), (660, 3)], gap=1.0)
    mediagen.make_tone(folder / "short.ogg", 440, 1.0)
    mediagen.make_text_as_audio(folder / "text.mp3")
    mediagen.make_empty(folder / "empty.wav")
    return {name: str(folder / name) for name in ("tones.wav", "short.ogg", "text.mp3", "empty.wav")}


@pytest.fixture(scope="module")
def server():
    """One server for the module (stopping one takes half a second); each test resets it."""
    with FakeServer() as server:
        yield server


def fresh_stt(server, **keys) -> FakeSTT:
    server.fault = None
    with server.lock:
        server.requests.clear()
    return FakeSTT(server, **keys)


@pytest.fixture
def stt(server):
    return fresh_stt(server)


def openai_transcriber(stt, **kwargs) -> T.OpenAITranscriber:
    return T.OpenAITranscriber(api_key=kwargs.pop("api_key", stt.openai_key), base_url=stt.openai_base_url,
                               **kwargs)


def elevenlabs_transcriber(stt, **kwargs) -> T.ElevenLabsTranscriber:
    return T.ElevenLabsTranscriber(api_key=kwargs.pop("api_key", stt.elevenlabs_key),
                                   base_url=stt.elevenlabs_base_url, **kwargs)


MAKERS = {"openai": openai_transcriber, "elevenlabs": elevenlabs_transcriber}


def timed(transcript: T.Transcript) -> list[tuple[float, float, str]]:
    return [(s.start, s.end, s.text) for s in transcript.segments]


# -- the transcript contract -----------------------------------------------------------------
def sample_transcript(**changes) -> T.Transcript:
    values = dict(text="Guten Tag. Wie geht es?", language="de", duration=5.0, provider="elevenlabs",
                  model="scribe_v1", usage={"audio_seconds": 5.0}, has_timestamps=True,
                  segments=[T.Segment(0.0, 1.5, "Guten Tag.", "speaker_0"),
                            T.Segment(1.5, 2.0, "Ja.", "speaker_0"),
                            T.Segment(2.5, 4.25, "Wie geht es?", "speaker_1")],
                  raw_responses=[{"offset": 0.0, "duration": 5.0, "response": {"text": "Guten Tag."}}])
    values.update(changes)
    return T.Transcript(**values)


def test_json_shape_is_the_contract():
    data = json.loads(sample_transcript().to_json())
    assert list(data) == ["text", "language", "duration", "provider", "model", "has_timestamps", "note",
                          "segments", "usage"]
    assert data["segments"][2] == {"id": 3, "start": 2.5, "end": 4.25, "text": "Wie geht es?",
                                   "speaker": "speaker_1"}
    assert [s["id"] for s in data["segments"]] == [1, 2, 3]


def test_dict_round_trip():
    transcript = sample_transcript()
    assert T.Transcript.from_dict(transcript.to_dict()) == transcript
    assert T.Transcript.from_dict(json.loads(transcript.to_json())).raw_responses == []


def test_txt_has_one_paragraph_per_speaker_turn():
    assert sample_transcript().to_txt() == "speaker_0: Guten Tag. Ja.\n\nspeaker_1: Wie geht es?\n"
    plain = sample_transcript(segments=[T.Segment(0, 1, "Eins."), T.Segment(1, 2, "Zwei.")])
    assert plain.to_txt() == "Eins.\nZwei.\n"


def test_subtitles_parse_back():
    transcript = sample_transcript()
    for cues in (parse_srt(transcript.to_srt()), parse_vtt(transcript.to_vtt())):
        assert [(c.start, c.end, c.text) for c in cues] == [(s.start, s.end, s.text) for s in transcript.segments]


def test_no_subtitles_without_timestamps():
    with pytest.raises(ValueError, match="no timestamps"):
        sample_transcript(has_timestamps=False).to_srt()


def word(text, start, end, speaker="speaker_0", kind="word"):
    return {"text": text, "start": start, "end": end, "type": kind, "speaker_id": speaker, "logprob": 0.0}


def spaced(*words):
    items = []
    for item in words:
        if items:
            items.append(word(" ", items[-1]["end"], item["start"], item["speaker_id"], "spacing"))
        items.append(item)
    return items


def test_group_words_on_speaker_change_and_pause():
    words = spaced(word("Hallo", 0.0, 0.4), word("du.", 0.5, 0.8), word("Ja", 1.0, 1.2, "speaker_1"),
                   word("gut", 1.3, 1.5, "speaker_1"), word("danach", 3.0, 3.5, "speaker_1"))
    assert [(s.start, s.end, s.text, s.speaker) for s in T.group_words(words)] == [
        (0.0, 0.8, "Hallo du.", "speaker_0"), (1.0, 1.5, "Ja gut", "speaker_1"),
        (3.0, 3.5, "danach", "speaker_1")]


def test_group_words_on_sentence_end_once_long_enough():
    words = spaced(word("Kurz.", 0.0, 0.5), word("Das", 0.6, 0.8), word("ist", 0.9, 1.0),
                   word("ein", 1.1, 1.2), word("längerer", 1.3, 1.8), word("Satz.", 1.9, 2.2),
                   word("Neu", 2.3, 2.5))
    assert [s.text for s in T.group_words(words)] == ["Kurz. Das ist ein längerer Satz.", "Neu"]


def test_group_words_respects_length_limits():
    words = spaced(*[word(f"w{i}", i * 0.9, i * 0.9 + 0.8) for i in range(40)])
    segments = T.group_words(words)
    assert len(segments) > 1
    assert all(s.end - s.start <= T.MAX_SEGMENT_SECONDS for s in segments)
    long_words = spaced(*[word("x" * 60, i * 0.1, i * 0.1 + 0.1) for i in range(10)])
    assert all(len(s.text) <= T.MAX_SEGMENT_CHARS for s in T.group_words(long_words))


# -- providers end to end --------------------------------------------------------------------
def test_openai_whisper_gives_timed_segments(stt, media):
    transcript = T.transcribe_media(media["tones.wav"], openai_transcriber(stt), language="de",
                                    prompt="Zeitzeugen, Namen")
    assert timed(transcript) == [(a, b, text) for (a, b), text in zip(TONE_TIMES, TONE_TEXTS)]
    assert transcript.text == " ".join(TONE_TEXTS)
    assert (transcript.language, transcript.duration, transcript.has_timestamps) == ("de", 11.0, True)
    assert transcript.usage == {"audio_seconds": 11.0}
    assert transcript.raw_responses[0]["response"]["task"] == "transcribe"
    [upload] = stt.uploads
    assert upload.fields == {"model": "whisper-1", "response_format": "verbose_json",
                             "timestamp_granularities[]": "segment", "language": "de",
                             "prompt": "Zeitzeugen, Namen"}
    assert upload.filename == "audio.ogg"


def test_openai_gpt4o_is_text_only(stt, media):
    transcript = T.transcribe_media(media["tones.wav"], openai_transcriber(stt, model="gpt-4o-transcribe"))
    assert transcript.text == " ".join(TONE_TEXTS)
    assert not transcript.has_timestamps
    assert transcript.note == "gpt-4o-transcribe returns text only: no subtitles"
    assert timed(transcript) == [(0.0, 11.0, " ".join(TONE_TEXTS))]
    assert transcript.usage["tokens"] > 0 and transcript.usage["audio_seconds"] == 11.0
    assert stt.uploads[0].fields == {"model": "gpt-4o-transcribe", "response_format": "json"}


def test_openai_diarize_model_gives_speaker_labelled_segments(stt, media):
    transcriber = openai_transcriber(stt, model="gpt-4o-transcribe-diarize")
    transcript = T.transcribe_media(media["tones.wav"], transcriber, language="de", prompt="Zeitzeugen")
    assert [(s.start, s.end, s.text, s.speaker) for s in transcript.segments] == [
        (0.0, 3.0, TONE_TEXTS[0], "speaker_A"), (4.0, 7.0, TONE_TEXTS[1], "speaker_B"),
        (8.0, 11.0, TONE_TEXTS[2], "speaker_A")]
    assert transcript.has_timestamps and transcript.to_txt().startswith(f"speaker_A: {TONE_TEXTS[0]}\n\nspeaker_B:")
    assert stt.uploads[0].fields == {"model": "gpt-4o-transcribe-diarize", "response_format": "diarized_json",
                                     "chunking_strategy": "auto", "language": "de"}  # no prompt: not taken
    assert transcript.usage["tokens"] > 0


def test_gpt4o_length_limit_splits_per_model(stt, media):
    transcriber = openai_transcriber(stt, model="gpt-4o-mini-transcribe")
    transcriber.max_chunk_seconds = {"gpt-4o-mini-transcribe": 5.0}
    transcript = T.transcribe_media(media["tones.wav"], transcriber)
    assert len(stt.uploads) == 3
    assert [s.text for s in transcript.segments] == TONE_TEXTS
    assert [round(s.start, 1) for s in transcript.segments] == [0.0, 3.5, 7.5]


def test_gpt4o_chunks_stay_under_the_reported_1400_second_cap():
    for model in ("gpt-4o-transcribe", "gpt-4o-mini-transcribe"):
        assert T.OpenAITranscriber.max_chunk_seconds[model] < 1400


def test_a_too_long_answer_splits_the_chunk_smaller_instead_of_failing(stt, media):
    """The provider's "longer than N seconds which is the maximum" is a reason to cut smaller."""
    stt.duration_caps["gpt-4o-transcribe"] = 5.0
    transcriber = openai_transcriber(stt, model="gpt-4o-transcribe")
    transcript = T.transcribe_media(media["tones.wav"], transcriber)
    assert [round(u.duration, 1) for u in stt.uploads] == [11.0, 3.5, 4.0, 3.5]  # one refusal, then 3 pieces
    assert [s.text for s in transcript.segments] == TONE_TEXTS
    assert [round(s.start, 1) for s in transcript.segments] == [0.0, 3.5, 7.5]
    assert transcriber.max_chunk_seconds["gpt-4o-transcribe"] < 5.0  # the next file is cut small at once


def test_an_upload_at_the_limit_fits_the_request_with_its_form_fields(stt, tmp_path):
    """OpenAI's 25 MiB is the whole request: the multipart overhead must fit inside it."""
    transcriber = openai_transcriber(stt)
    at_limit = tmp_path / "at_limit.ogg"
    with open(at_limit, "wb") as handle:
        handle.truncate(transcriber.max_upload_bytes)
    with pytest.raises(PermanentError) as caught:  # refused for its content, not for its size
        transcriber.transcribe_chunk(str(at_limit), language="de", prompt="Zeitzeugen, Namen " * 20)
    assert caught.value.status == 400 and caught.value.error_class == "unsupported_media"


def test_split_and_merged_equals_unsplit(stt, media):
    whole = T.transcribe_media(media["tones.wav"], T.choose_transcriber("openai", env_for(stt)))
    env = env_for(stt, VERBATIM_OPENAI_MAX_UPLOAD_BYTES="25000")
    split = T.transcribe_media(media["tones.wav"], T.choose_transcriber("openai", env))
    assert len(stt.uploads) == 4 and all(u.size <= 25000 for u in stt.uploads[1:])
    assert [s.text for s in split.segments] == [s.text for s in whole.segments]
    for a, b in zip(split.segments, whole.segments):
        assert a.start == pytest.approx(b.start, abs=1.0) and a.end == pytest.approx(b.end, abs=1.0)
    assert [s["id"] for s in split.to_dict()["segments"]] == [1, 2, 3]
    assert [r["offset"] for r in split.raw_responses] == [0.0, pytest.approx(3.5, abs=0.03),
                                                          pytest.approx(7.5, abs=0.03)]
    assert split.text == whole.text and split.duration == whole.duration


def test_elevenlabs_groups_words_by_speaker(stt, media):
    transcript = T.transcribe_media(media["tones.wav"], elevenlabs_transcriber(stt), language="de")
    assert [(s.start, s.end, s.text, s.speaker) for s in transcript.segments] == [
        (0.0, 3.0, TONE_TEXTS[0], "speaker_0"), (4.0, 7.0, TONE_TEXTS[1], "speaker_1"),
        (8.0, 11.0, TONE_TEXTS[2], "speaker_0")]
    assert transcript.to_txt().startswith(f"speaker_0: {TONE_TEXTS[0]}\n\nspeaker_1: ")
    assert transcript.language == "de" and transcript.usage == {"audio_seconds": 11.0}
    assert stt.uploads[0].fields == {"model_id": "scribe_v1", "diarize": "true",
                                     "timestamps_granularity": "word", "language_code": "de"}
    [request] = stt.server.requests
    assert request.headers["xi-api-key"] == stt.elevenlabs_key and "authorization" not in request.headers


def test_elevenlabs_untimed_items_are_placed_between_their_neighbours(stt, media):
    """Word start/end are optional in the official SDK: an untimed item is no malformed answer."""
    stt.untimed_items = True
    transcript = T.transcribe_media(media["tones.wav"], elevenlabs_transcriber(stt))
    assert stt.server.count(ELEVENLABS_PATH) == 1
    assert transcript.segments[0].text.startswith("(music)")
    assert [s.text.removeprefix("(music) ") for s in transcript.segments] == TONE_TEXTS
    starts = [s.start for s in transcript.segments]
    assert starts == sorted(starts) and all(s.end >= s.start for s in transcript.segments)


def test_elevenlabs_sends_names_and_places_as_keyterms(stt, media):
    """Scribe v2 takes ``keyterms`` (a repeated form field); the prompt is no longer dropped."""
    transcriber = elevenlabs_transcriber(stt, model="scribe_v2")
    transcriber.transcribe_chunk(media["short.ogg"], prompt="Theresienstadt, Rywka Lipszyc; Łódź\n" + "x" * 60)
    assert stt.uploads[0].fields["keyterms"] == ["Theresienstadt", "Rywka Lipszyc", "Łódź"]


def test_keyterms_follow_the_documented_limits():
    terms = T.ElevenLabsTranscriber.keyterms(", ".join(f"name{n}" for n in range(150)) + ", a b c d e f")
    assert len(terms) == T.ElevenLabsTranscriber.MAX_KEYTERMS and all(len(t) < 50 for t in terms)
    assert "a b c d e f" not in terms  # more than five words
    assert T.ElevenLabsTranscriber.keyterms(None) == []


def test_keyterm_surcharge_is_said_in_the_estimate():
    v2 = T.ElevenLabsTranscriber(api_key="el-test-a1b2c3", model="scribe_v2")
    assert v2.cost_notes("Theresienstadt") and "keyterm" in v2.cost_notes("Theresienstadt")[0]
    assert v2.cost_notes(None) == []
    v2.keyterm_price_per_hour = 0.05
    assert v2.estimate_cost(3600, prompt="Theresienstadt") == pytest.approx(v2.estimate_cost(3600) + 0.05)
    v1 = T.ElevenLabsTranscriber(api_key="el-test-a1b2c3")
    assert "scribe_v2" in v1.cost_notes("Theresienstadt")[0]  # v1 takes no keyterms: said, not dropped


def test_every_chunk_goes_through_call_and_the_workdir_is_removed(stt, media, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []

    def call(fn, key=None):
        seen.append(fn)
        return fn()

    transcriber = openai_transcriber(stt)
    transcriber.max_upload_bytes = 25000
    T.transcribe_media(media["tones.wav"], transcriber, call=call)
    assert len(seen) == 3 == stt.server.count(OPENAI_PATH)
    stt.server.fault = lambda request: Fault("status", 500, {"error": {"message": "boom"}})
    with pytest.raises(RetryableError):
        T.transcribe_media(media["tones.wav"], transcriber, call=call)
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("provider", ["openai", "elevenlabs"])
def test_one_instance_serves_many_threads(stt, media, provider):
    transcriber = MAKERS[provider](stt)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: transcriber.transcribe_chunk(media["short.ogg"]), range(8)))
    assert {r.text for r in results} == {"tone440."}
    assert len(stt.uploads) == 8


@pytest.mark.parametrize("name", ["empty.wav", "text.mp3"])
def test_bad_input_fails_before_any_request(stt, media, name):
    with pytest.raises(PermanentError) as caught:
        T.transcribe_media(media[name], openai_transcriber(stt))
    assert caught.value.error_class in ("empty_file", "unsupported_media")
    assert stt.server.count() == 0


# -- errors, classified once -----------------------------------------------------------------
RATE_LIMITED = {"openai": {"error": {"message": "Rate limit reached for whisper-1", "type": "requests",
                                     "param": None, "code": "rate_limit_exceeded"}},
                "elevenlabs": {"detail": {"status": "too_many_concurrent_requests",
                                          "message": "Too many concurrent requests."}}}
QUOTA = {"openai": {"error": {"message": "You exceeded your current quota.", "type": "insufficient_quota",
                              "param": None, "code": "insufficient_quota"}},
         "elevenlabs": {"detail": {"status": "quota_exceeded", "message": "Quota exceeded."}}}


def fault_always(stt, fault):
    stt.server.fault = lambda request: fault


@pytest.mark.parametrize("provider", ["openai", "elevenlabs"])
def test_429_with_retry_after_is_a_rate_limit(stt, media, provider):
    fault_always(stt, Fault("status", 429, RATE_LIMITED[provider], {"Retry-After": "7"}))
    with pytest.raises(RateLimitError) as caught:
        MAKERS[provider](stt).transcribe_chunk(media["short.ogg"])
    assert caught.value.retry_after == 7.0


@pytest.mark.parametrize("provider, status", [("openai", 429), ("elevenlabs", 429), ("elevenlabs", 401)])
def test_quota_is_an_account_error(stt, media, provider, status):
    fault_always(stt, Fault("status", status, QUOTA[provider]))
    with pytest.raises(AccountError):
        MAKERS[provider](stt).transcribe_chunk(media["short.ogg"])


@pytest.mark.parametrize("status", [400, 401])
def test_elevenlabs_quota_exceeded_is_an_account_error_whatever_the_status(stt, media, status):
    """ElevenLabs' help centre lists quota_exceeded under "API - Error Code 400 or 401"."""
    fault_always(stt, Fault("status", status, QUOTA["elevenlabs"]))
    with pytest.raises(AccountError) as caught:
        elevenlabs_transcriber(stt).transcribe_chunk(media["short.ogg"])
    assert caught.value.error_class == "quota"


def test_structured_code_decides_before_the_message_text(stt, media):
    """A 400 whose words say "unsupported" but whose code names a parameter is no media error."""
    fault_always(stt, Fault("status", 400, {"error": {
        "message": "Unsupported value: 'temperature' does not support 0 with this model.",
        "type": "invalid_request_error", "param": "temperature", "code": "unsupported_value"}}))
    with pytest.raises(PermanentError) as caught:
        openai_transcriber(stt).transcribe_chunk(media["short.ogg"])
    assert caught.value.error_class == "bad_request"


@pytest.mark.parametrize("provider", ["openai", "elevenlabs"])
def test_wrong_key_is_an_account_error(stt, media, provider):
    with pytest.raises(AccountError) as caught:
        MAKERS[provider](stt, api_key="sk-test-wrong-key-123").transcribe_chunk(media["short.ogg"])
    assert caught.value.status == 401 and caught.value.error_class == "auth"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("provider", ["openai", "elevenlabs"])
@pytest.mark.parametrize("fault", [Fault("status", 500, {"error": {"message": "internal"}}),
                                   Fault("status", 503, "upstream unavailable"),
                                   Fault("reset"), Fault("truncate"), Fault("garbage")],
                         ids=["500", "503", "reset", "truncate", "garbage"])
def test_transient_faults_are_retryable(stt, media, provider, fault):
    fault_always(stt, fault)
    with pytest.raises(RetryableError) as caught:
        MAKERS[provider](stt).transcribe_chunk(media["short.ogg"])
    assert not isinstance(caught.value, RateLimitError)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("provider", ["openai", "elevenlabs"])
def test_a_hanging_server_times_out(stt, media, provider):
    fault_always(stt, Fault("hang"))
    held_before = stt.server.holding
    with pytest.raises(RetryableError) as caught:
        MAKERS[provider](stt, timeout=1.0).transcribe_chunk(media["short.ogg"])
    assert stt.server.holding == held_before + 1  # it gave up while the server still held the request
    assert caught.value.error_class == "timeout"


@pytest.mark.parametrize("provider", ["openai", "elevenlabs"])
def test_undecodable_upload_is_permanent(stt, media, provider):
    with pytest.raises(PermanentError) as caught:
        MAKERS[provider](stt).transcribe_chunk(media["text.mp3"])
    assert caught.value.status == 400 and caught.value.error_class == "unsupported_media"


def test_oversized_upload_is_permanent(stt, tmp_path):
    big = tmp_path / "big.ogg"
    with open(big, "wb") as handle:
        handle.truncate(26214400 + 1)
    with pytest.raises(PermanentError) as caught:
        openai_transcriber(stt).transcribe_chunk(str(big))
    assert caught.value.status == 413 and caught.value.error_class == "too_large"


def test_merge_keeps_offsets_usage_and_raw():
    def part(text, start, end, seconds):
        return T.Transcript(text, [T.Segment(start, end, text)], "de", None, "openai", "whisper-1",
                            {"audio_seconds": seconds}, True, raw_responses=[{"text": text}])

    merged = T.merge_chunks([(Chunk("a", 0.0, 10.0), part("eins", 1.0, 2.0, 10)),
                             (Chunk("b", 10.0, 5.0), part("zwei", 0.5, 1.5, 5))], duration=15.0)
    assert timed(merged) == [(1.0, 2.0, "eins"), (10.5, 11.5, "zwei")]
    assert merged.usage == {"audio_seconds": 15.0} and merged.text == "eins zwei"
    assert merged.raw_responses[1] == {"offset": 10.0, "duration": 5.0, "response": {"text": "zwei"}}


# -- output files ----------------------------------------------------------------------------
def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_outputs_are_written_with_hashes(tmp_path):
    transcript = sample_transcript()
    folder = tmp_path / "abc123"
    written = T.write_transcript_outputs(transcript, folder, root=tmp_path)
    assert set(written) == {"txt", "json", "srt", "vtt", "raw"}
    for key, info in written.items():
        assert Path(info.path) == folder / T.OUTPUT_NAMES[key]
        assert info.sha256 == sha256(info.path) and info.size == os.path.getsize(info.path)
    assert json.loads(Path(written["json"].path).read_text()) == transcript.to_dict(raw=False)
    assert len(parse_srt(Path(written["srt"].path).read_text())) == 3
    assert len(parse_vtt(Path(written["vtt"].path).read_text())) == 3
    assert json.loads(gzip.decompress(Path(written["raw"].path).read_bytes())) == transcript.raw_responses
    again = T.write_transcript_outputs(transcript, folder, root=tmp_path)
    assert again["raw"].sha256 == written["raw"].sha256  # gzip without a timestamp


def test_text_only_writes_no_subtitles_and_removes_stale_ones(tmp_path):
    folder = tmp_path / "abc123"
    T.write_transcript_outputs(sample_transcript(), folder, root=tmp_path)
    written = T.write_transcript_outputs(sample_transcript(has_timestamps=False), folder, root=tmp_path)
    assert set(written) == {"txt", "json", "raw"}
    assert sorted(os.listdir(folder)) == ["transcript.json", "transcript.raw.json.gz", "transcript.txt"]


def test_outputs_stay_under_the_root(tmp_path):
    with pytest.raises(ValueError):
        T.write_transcript_outputs(sample_transcript(), tmp_path / ".." / "elsewhere", root=tmp_path)


# -- choosing a provider ---------------------------------------------------------------------
def test_choose_by_name_env_or_first_key():
    both = {"OPENAI_API_KEY": "sk-test-a1b2c3", "ELEVENLABS_API_KEY": "el-test-a1b2c3"}
    assert isinstance(T.choose_transcriber(env=both), T.OpenAITranscriber)
    assert isinstance(T.choose_transcriber("elevenlabs", both), T.ElevenLabsTranscriber)
    chosen = T.choose_transcriber(env={**both, "VERBATIM_TRANSCRIPTION_PROVIDER": "elevenlabs"}, model="scribe_v2")
    assert (chosen.name, chosen.model) == ("elevenlabs", "scribe_v2")
    only_eleven = T.choose_transcriber(env={"ELEVENLABS_API_KEY": "el-test-a1b2c3"})
    assert only_eleven.base_url == "https://api.elevenlabs.io" and only_eleven.max_upload_bytes is None


@pytest.mark.parametrize("name, env, model, message", [
    (None, {}, None, "set OPENAI_API_KEY or ELEVENLABS_API_KEY"),
    ("whisperx", {}, None, "choose from openai, elevenlabs"),
    ("elevenlabs", {"OPENAI_API_KEY": "sk-test-a1b2c3"}, None, "set ELEVENLABS_API_KEY"),
    ("openai", {"OPENAI_API_KEY": "sk-test-a1b2c3"}, "whisper-9", "unknown model 'whisper-9'"),
    ("openai", {"OPENAI_API_KEY": "sk-test-a1b2c3", "VERBATIM_OPENAI_MAX_UPLOAD_BYTES": "lots"}, None,
     "VERBATIM_OPENAI_MAX_UPLOAD_BYTES must be a positive number"),
])
def test_configuration_errors_say_what_to_set(name, env, model, message, monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # as where its install failed
    with pytest.raises(ConfigError, match=message):
        T.choose_transcriber(name, env, model)


def test_cost_estimates():
    assert T.OpenAITranscriber(api_key="sk-test-a1b2c3").estimate_cost(3600) == pytest.approx(0.36)
    mini = T.OpenAITranscriber(api_key="sk-test-a1b2c3", model="gpt-4o-mini-transcribe")
    assert mini.estimate_cost(600) == pytest.approx(0.03)
    assert T.ElevenLabsTranscriber(api_key="el-test-a1b2c3").estimate_cost(3600) == pytest.approx(0.40)


# -- the standalone command ------------------------------------------------------------------
def run_cli(args, env, cwd):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ELEVENLABS_", "VERBATIM_"))}
    return subprocess.run([sys.executable, SCRIPT, *args], env={**clean, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def canary_stt(server):
    return fresh_stt(server, openai_key=CANARY)


@pytest.mark.timeout(120)
def test_cli_prints_subtitles_and_never_the_key(canary_stt, media, tmp_path):
    env = {"OPENAI_API_KEY": CANARY, "OPENAI_BASE_URL": canary_stt.openai_base_url}
    result = run_cli([media["tones.wav"], "--format", "srt", "--language", "de", "-v"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert [c.text for c in parse_srt(result.stdout)] == TONE_TEXTS
    assert CANARY not in result.stdout + result.stderr

    canary_stt.openai_key = "sk-test-some-other-key"  # now the server rejects the canary
    result = run_cli([media["tones.wav"], "-v"], env, tmp_path)
    assert result.returncode == 2 and "API key was rejected" in result.stderr
    assert CANARY not in result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_cli_exit_codes(stt, media, tmp_path):
    env = env_for(stt)
    odd = tmp_path / "-odd name.wav"
    mediagen.copy_to(media["tones.wav"], odd)
    result = run_cli(["--provider", "elevenlabs", "--format", "json", "--", str(odd)], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert [s["speaker"] for s in json.loads(result.stdout)["segments"]] == ["speaker_0", "speaker_1", "speaker_0"]

    result = run_cli([media["text.mp3"]], env, tmp_path)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and "unsupported_media" in result.stderr

    result = run_cli([media["tones.wav"]], {}, tmp_path)
    assert result.returncode == 2 and "OPENAI_API_KEY" in result.stderr

    result = run_cli([media["tones.wav"], "--model", "gpt-4o-transcribe", "--format", "vtt"], env, tmp_path)
    assert result.returncode == 2 and "text only" in result.stderr
    assert stt.server.count(OPENAI_PATH) == 0 and stt.server.count(ELEVENLABS_PATH) == 1


def test_cli_help_has_an_example(tmp_path):
    result = run_cli(["--help"], {}, tmp_path)
    assert result.returncode == 0 and "example:" in result.stdout
