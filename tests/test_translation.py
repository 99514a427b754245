"""Offline tests for translation.py against fake DeepL, Microsoft and OpenAI servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import translation as tr
from benchmarks.fake_translate import (FakeDeepL, FakeMicrosoft, FakeOpenAIChat, fake_translate, make_sentence,
                                       make_transcript)
from benchmarks.fakeserver import Fault
from pipeline.config import ConfigError
from pipeline.errors import AccountError, PermanentError, RateLimitError, RetryableError
from pipeline.subtitles import PDF, RLE, Cue, format_srt, format_vtt, parse_srt, parse_vtt

REPO = Path(__file__).resolve().parents[1]
FAKES = {"deepl": FakeDeepL, "microsoft": FakeMicrosoft, "openai": FakeOpenAIChat}
CANARY = "canary-KEY-7f3a9c1e5b"


@pytest.fixture(scope="session")
def servers():
    """One running fake per provider for the whole session (starting and stopping costs time)."""
    fakes = {name: cls().__enter__() for name, cls in FAKES.items()}
    yield fakes
    for fake in fakes.values():
        fake.__exit__(None, None, None)


@pytest.fixture
def fakes(servers):
    """``fakes(name, **switches) -> (fake, translator)`` on a freshly reset fake."""
    for fake in servers.values():
        fake.reset()

    def get(name: str, **switches):
        fake = servers[name]
        for key, value in switches.items():
            setattr(fake, key, value)
        return fake, tr.TRANSLATORS[name].from_env(fake.env())

    return get


@pytest.fixture(params=sorted(FAKES))
def provider(request, fakes):
    """(fake server, translator) for each provider in turn."""
    return fakes(request.param)


def write_json(folder: Path, payload: dict, name: str = "transcript.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    return path


def document(payload: dict, tmp_path: Path) -> tr.SourceDocument:
    return tr.load_source(write_json(tmp_path, payload))


def source_cues(doc: tr.SourceDocument) -> list[tuple[float, float]]:
    return [(c.start, c.end) for c in parse_srt(format_srt([Cue(n, u.start, u.end, u.text)
                                                           for n, u in enumerate(doc.units, 1)]))]


# -- end to end through every provider ----------------------------------------------------
@pytest.mark.parametrize("target", ["en", "de", "he"])
def test_transcripts_translate_through_each_provider(provider, target, tmp_path):
    fake, translator = provider
    for seed in range(1, 4):  # 3 providers x 3 targets x 3 transcripts = 27 documents
        source = "de" if seed % 2 else "en"
        payload = make_transcript(seed, source, n_segments=5 + seed)
        doc = document(payload, tmp_path)
        before = fake.server.count()
        result = tr.translate_document(doc, target, translator)

        expected = [s["text"] if source == target else fake_translate(s["text"], target)
                    for s in payload["segments"]]
        assert [u.text for u in result.units] == expected
        assert [(u.start, u.end, u.speaker) for u in result.units] == \
               [(s["start"], s["end"], s["speaker"]) for s in payload["segments"]]
        assert result.language == target and result.source_language == source
        if source == target:
            assert (result.provider, result.cost, fake.server.count()) == ("copy", 0.0, before)
        else:
            assert result.provider == translator.name and result.cost > 0
            assert fake.server.count() - before == result.usage["requests"] == 1

        folder = tmp_path / f"out-{seed}"
        written = tr.write_translation_outputs(result, folder, root=tmp_path)
        assert sorted(written) == ["json", "srt", "txt", "vtt"]
        srt = parse_srt((folder / tr.output_name(target, "srt")).read_text(encoding="utf-8"))
        vtt = parse_vtt((folder / tr.output_name(target, "vtt")).read_text(encoding="utf-8"))
        assert [(c.start, c.end) for c in srt] == [(c.start, c.end) for c in vtt] == source_cues(doc)


def test_output_names_and_rtl_marks_only_outside_json(fakes, tmp_path):
    _, translator = fakes("deepl")
    doc = document(make_transcript(7, "de", 5), tmp_path)
    hebrew = tr.translate_document(doc, "he", translator)
    english = tr.translate_document(doc, "en", translator)
    written = tr.write_translation_outputs(hebrew, tmp_path / "he", root=tmp_path)
    assert {fmt: Path(f.path).name for fmt, f in written.items()} == {
        fmt: f"translation.he.{fmt}" for fmt in ("txt", "json", "srt", "vtt")}
    txt = Path(written["txt"].path).read_text(encoding="utf-8").splitlines()
    assert len(txt) == 5 and all(line.startswith(tr.RLM + "speaker_") for line in txt)
    for fmt, parse in (("srt", parse_srt), ("vtt", parse_vtt)):
        cues = parse(Path(written[fmt].path).read_text(encoding="utf-8"))
        assert all(c.text.startswith(RLE) and c.text.endswith(PDF) for c in cues)
    raw_json = Path(written["json"].path).read_text(encoding="utf-8")
    assert not set(raw_json) & {tr.RLM, RLE, PDF}
    data = json.loads(raw_json)
    assert [s["text"] for s in data["segments"]] == [u.text for u in hebrew.units]
    assert data["language"] == "he" and data["provider"] == "deepl"

    english_files = tr.write_translation_outputs(english, tmp_path / "en", root=tmp_path)
    for written_file in english_files.values():
        assert not set(Path(written_file.path).read_text(encoding="utf-8")) & {tr.RLM, RLE, PDF}


def test_untimed_source_writes_only_txt_and_json(fakes, tmp_path):
    _, translator = fakes("microsoft")
    doc = document(make_transcript(8, "de", 4, timestamps=False), tmp_path)
    result = tr.translate_document(doc, "en", translator)
    assert not result.has_timestamps
    assert sorted(tr.write_translation_outputs(result, tmp_path / "x", root=tmp_path)) == ["json", "txt"]
    with pytest.raises(ValueError):
        tr.render_output(result, "srt")
    with pytest.raises(ValueError):
        tr.output_name("../he", "txt")


# -- the wrong language is never accepted -------------------------------------------------
def test_english_returned_for_hebrew_is_rejected(fakes, tmp_path):
    _, translator = fakes("deepl", wrong_language=True)
    with pytest.raises(PermanentError) as caught:
        tr.translate_document(document(make_transcript(11, "de"), tmp_path), "he", translator)
    assert caught.value.error_class == "wrong_language"
    assert str(caught.value) == "deepl: output is English, not Hebrew"


def test_fallback_answer_is_used_when_primary_is_rejected(fakes, tmp_path):
    bad, primary = fakes("openai", wrong_language=True)
    good, fallback = fakes("microsoft")
    payload = make_transcript(12, "de")
    result = tr.translate_document(document(payload, tmp_path), "he", primary, fallback=fallback)
    assert bad.server.count() == 1 and good.server.count() == 1
    assert result.provider == "microsoft" and result.model is None
    assert [u.text for u in result.units] == [fake_translate(s["text"], "he") for s in payload["segments"]]
    assert result.usage["requests"] == 2  # the rejected attempt was paid for too


def test_fallback_is_used_when_the_primary_rejects_the_request(fakes, tmp_path):
    primary_fake, primary = fakes("deepl")
    _, fallback = fakes("openai")
    primary_fake.server.fault = lambda request: Fault("status", 400, {"message": "Value for 'target_lang' "
                                                                                 "not supported."})
    result = tr.translate_document(document(make_transcript(13, "de"), tmp_path), "he", primary,
                                   fallback=fallback)
    assert result.provider == "openai"


GERMAN = [make_sentence(random.Random(n), "de", n) for n in range(6)]


@pytest.mark.parametrize("translated, error_class", [
    ([fake_translate(s, "he") for s in GERMAN[:5]] + [" "], "empty_output"),
    (["אני"] * 6, "implausible_length"),
    ([fake_translate(s, "en") for s in GERMAN], "wrong_language"),
    (["[HE] " + fake_translate(s, "en") for s in GERMAN], "wrong_language"),
    (GERMAN, "wrong_language"),
])
def test_validation_rejects(translated, error_class):
    with pytest.raises(PermanentError) as caught:
        tr.validate_translation(GERMAN, translated, "he")
    assert caught.value.error_class == error_class


def test_validation_rejects_partly_untranslated_output():
    """The text as a whole reads as English, but a quarter of it was left in German."""
    source = [make_sentence(random.Random(n), "de", n) for n in range(12)]
    translated = [fake_translate(s, "en") for s in source[:9]] + source[9:]
    with pytest.raises(PermanentError) as caught:
        tr.validate_translation(source, translated, "en")
    assert caught.value.error_class == "wrong_language" and "3 of 12 units" in str(caught.value)
    tr.validate_translation(source, [fake_translate(s, "en") for s in source], "en")


# -- alignment: a short answer is split, never shifted ------------------------------------
@pytest.mark.parametrize("name", ["openai", "deepl"])
def test_fewer_units_are_retried_in_halves_with_exact_alignment(fakes, name, tmp_path):
    fake, translator = fakes(name, drop_units=1)
    payload = make_transcript(21, "de", 4)
    result = tr.translate_document(document(payload, tmp_path), "en", translator)
    sizes = [len(texts) for texts in fake.sent_texts()]
    assert sizes == [4, 2, 1, 1, 2, 1, 1]
    assert [u.text for u in result.units] == [fake_translate(s["text"], "en") for s in payload["segments"]]
    assert result.usage["requests"] == 7


def test_single_unit_mismatch_is_retryable(fakes, tmp_path, monkeypatch):
    fake, translator = fakes("deepl")
    monkeypatch.setattr(fake, "_answer", lambda texts, target: [])
    with pytest.raises(RetryableError) as caught:
        tr.translate_document(document(make_transcript(22, "de", 2), tmp_path), "en", translator)
    assert caught.value.error_class == "unit_mismatch"
    assert [len(t) for t in fake.sent_texts()] == [2, 1]


def test_an_answer_cut_at_the_token_limit_is_split_never_accepted(fakes, tmp_path):
    """finish_reason "length" with every line present (the last one cut short): not a translation."""
    payload = make_transcript(24, "de", 6)
    expected = [fake_translate(s["text"], "en") for s in payload["segments"]]
    full = "\n".join(f"[{n}] {text}" for n, text in enumerate(expected, 1))
    fake, translator = fakes("openai", max_answer_chars=len(full) - 3)
    result = tr.translate_document(document(payload, tmp_path), "en", translator)
    assert [len(texts) for texts in fake.sent_texts()] == [6, 3, 3]
    assert [u.text for u in result.units] == expected


def test_a_single_unit_cut_at_the_token_limit_is_not_accepted(fakes, tmp_path):
    fake, translator = fakes("openai", max_answer_chars=20)
    with pytest.raises(PermanentError) as caught:
        tr.translate_document(document(make_transcript(25, "de", 1), tmp_path), "en", translator)
    assert caught.value.error_class == "incomplete"
    assert [len(texts) for texts in fake.sent_texts()] == [1]


@pytest.mark.parametrize("model, sends_temperature", [("gpt-5-mini", False), ("o3-mini", False),
                                                      ("gpt-4o-mini", True)])
def test_reasoning_models_get_only_parameters_they_accept(fakes, tmp_path, model, sends_temperature):
    fake, _ = fakes("openai")
    translator = tr.OpenAIChatTranslator.from_env(fake.env(), model=model)
    result = tr.translate_document(document(make_transcript(26, "de", 2), tmp_path), "en", translator)
    assert result.model == model
    assert all(("temperature" in json.loads(b["body"])) == sends_temperature for b in fake.batches)


def test_a_rejected_chat_request_is_bad_request_not_a_media_error(fakes, tmp_path):
    fake, translator = fakes("openai")
    fake.server.fault = lambda request: Fault("status", 400, {"error": {
        "message": "Unsupported value: 'logprobs' is not supported.", "type": "invalid_request_error",
        "param": None, "code": None}})
    with pytest.raises(PermanentError) as caught:
        tr.translate_document(document(make_transcript(27, "de", 2), tmp_path), "en", translator)
    assert caught.value.error_class == "bad_request"


def test_mismatch_never_reaches_the_call_wrapper(fakes, tmp_path):
    """The runner's call wrapper retries provider errors; a mismatch is the splitter's business."""
    _, translator = fakes("microsoft", drop_units=1)
    seen = []

    def call(fn, key=None):
        result = fn()
        seen.append(type(result).__name__)
        return result

    tr.translate_document(document(make_transcript(23, "de", 2), tmp_path), "he", translator, call=call)
    assert seen == ["UnitMismatchError", "UnitBatch", "UnitBatch"]


# -- same language, mixed language --------------------------------------------------------
def test_same_language_is_copied_without_a_request(provider, tmp_path):
    fake, translator = provider
    payload = make_transcript(31, "de", 8)
    result = tr.translate_document(document(payload, tmp_path), "de", translator)
    assert fake.server.count() == 0
    assert (result.provider, result.cost, result.usage["requests"]) == ("copy", 0.0, 0)
    assert [u.text for u in result.units] == [s["text"] for s in payload["segments"]]
    assert result.kept_units == 8


def test_mixed_language_keeps_target_language_segments(fakes, tmp_path):
    fake, translator = fakes("deepl")
    payload = make_transcript(32, "de", 6)
    english = {2: "I remember the house and the garden very well.", 5: "We lived there together for many years."}
    for index, text in english.items():
        payload["segments"][index - 1]["text"] = text
    result = tr.translate_document(document(payload, tmp_path), "en", translator)
    sent = [text for texts in fake.sent_texts() for text in texts]
    assert fake.batches[0]["source"] == "DE"
    assert result.kept_units == 2
    for n, (segment, unit) in enumerate(zip(payload["segments"], result.units), 1):
        assert unit.text == (english[n] if n in english else fake_translate(segment["text"], "en"))
    assert not set(english.values()) & set(sent) and len(sent) == 4


def test_foreign_units_are_sent_without_a_source_language(fakes, tmp_path):
    fake, translator = fakes("deepl")
    payload = make_transcript(33, "de", 4)
    payload["segments"][1]["text"] = "I remember the house and the garden very well."
    result = tr.translate_document(document(payload, tmp_path), "he", translator)
    assert fake.batches[0]["source"] is None  # the provider detects per text
    assert result.kept_units == 0


# -- chunking -----------------------------------------------------------------------------
def test_plan_batches_respects_limits_and_cuts_between_units():
    texts = ["x" * 10] * 7 + ["y" * 100] + ["z"]
    assert tr.plan_batches(texts, max_items=3, max_chars=25) == [(0, 2), (2, 4), (4, 6), (6, 7), (7, 8), (8, 9)]
    assert tr.plan_batches([], max_items=3, max_chars=25) == []


def _long_transcript(n: int, sentences_per_unit: int = 1) -> dict:
    rng = random.Random(n)
    payload = make_transcript(41, "de", n)
    for index, segment in enumerate(payload["segments"], 1):
        segment["text"] = " ".join(make_sentence(rng, "de", index * 1000 + k) for k in range(sentences_per_unit))
    return payload


def test_deepl_batches_hold_at_most_50_texts_in_order(fakes, tmp_path):
    fake, translator = fakes("deepl")
    payload = _long_transcript(120)
    result = tr.translate_document(document(payload, tmp_path), "he", translator)
    batches = fake.sent_texts()
    contexts = [b["context"] for b in fake.batches]
    assert [len(b) for b in batches] == [50, 50, 20]
    assert [t for b in batches for t in b] == [s["text"] for s in payload["segments"]]
    assert contexts[0] is None and contexts[1].endswith(payload["segments"][49]["text"])
    assert [u.text for u in result.units] == [fake_translate(s["text"], "he") for s in payload["segments"]]


def test_microsoft_batches_stay_within_1000_items_and_50000_chars(fakes, tmp_path):
    fake, translator = fakes("microsoft")
    many = make_transcript(42, "de", 2100)
    long = _long_transcript(120, sentences_per_unit=20)  # ~1,100 characters a unit
    for payload, target in ((many, "en"), (long, "he")):
        before = len(fake.batches)
        result = tr.translate_document(document(payload, tmp_path), target, translator)
        batches = fake.sent_texts()[before:]
        assert all(len(b) <= 1000 and sum(map(len, b)) <= 50_000 for b in batches) and len(batches) >= 3
        assert [t for b in batches for t in b] == [s["text"] for s in payload["segments"]]
        assert [u.text for u in result.units] == [fake_translate(s["text"], target) for s in payload["segments"]]


def test_chat_batches_follow_the_token_budget_with_context(fakes, tmp_path):
    fake, translator = fakes("openai")
    translator.max_chars = 400
    payload = _long_transcript(30)
    result = tr.translate_document(document(payload, tmp_path), "en", translator)
    batches, records = fake.sent_texts(), list(fake.batches)
    assert len(batches) >= 4 and all(sum(map(len, b)) <= 400 for b in batches)
    assert [t for b in batches for t in b] == [s["text"] for s in payload["segments"]]
    assert records[0]["context"] is None
    assert all("do not translate" in r["context"] and batches[i - 1][-1] in r["context"]
               for i, r in enumerate(records[1:], 1))
    assert result.usage["tokens"] > 0 and result.cost > 0


def test_chat_prompt_demands_a_verbatim_translation():
    messages = tr.OpenAIChatTranslator.messages(["Ich ähm ich war", "Ja."], source="de", target="he",
                                                context="Vorher.")
    system, user = messages[0]["content"], messages[1]["content"]
    assert "Hebrew (he)" in system and "German" in system
    for phrase in ("verbatim", "ähm", "repetitions", "false starts", "Never summarise", "one line per"):
        assert phrase in system
    assert user.splitlines()[:2] == ["Context (do not translate):", "Vorher."]
    assert user.splitlines()[-2:] == ["[1] Ich ähm ich war", "[2] Ja."]


def test_requests_speak_each_wire_format(fakes, tmp_path):
    doc = document(make_transcript(45, "de", 3), tmp_path)
    for name in FAKES:
        fake, translator = fakes(name)
        tr.translate_document(doc, "he", translator)
        request = fake.server.requests[-1]
        if name == "deepl":
            body = request.json()
            assert (body["target_lang"], body["source_lang"], len(body["text"])) == ("HE", "DE", 3)
        elif name == "microsoft":
            assert (request.query["to"], request.query["from"]) == (["he"], ["de"])
            assert request.headers["ocp-apim-subscription-region"] == "westeurope"
            assert request.json() == [{"Text": u.text} for u in doc.units]
        else:
            body = request.json()
            assert (body["model"], body["temperature"]) == ("gpt-4o-mini", 0)
            assert "into Hebrew (he)" in body["messages"][0]["content"]
            assert request.headers.get("x-stainless-retry-count") == "0"


# -- errors are classified once -----------------------------------------------------------
def _fail_with(fake, status, body, headers=None):
    fake.server.fault = lambda request: Fault("status", status, body, headers or {})


def test_429_is_a_rate_limit_with_retry_after(provider, tmp_path):
    fake, translator = provider
    _fail_with(fake, 429, {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}},
               {"Retry-After": "7"})
    with pytest.raises(RateLimitError) as caught:
        tr.translate_document(document(make_transcript(51, "de"), tmp_path), "en", translator)
    assert caught.value.retry_after == 7.0


def test_500_is_retryable(provider, tmp_path):
    fake, translator = provider
    _fail_with(fake, 500, {"message": "Internal error"})
    with pytest.raises(RetryableError) as caught:
        tr.translate_document(document(make_transcript(52, "de"), tmp_path), "he", translator)
    assert not isinstance(caught.value, RateLimitError) and caught.value.status == 500


def test_deepl_456_and_openai_insufficient_quota_are_account_errors(fakes, tmp_path):
    doc = document(make_transcript(53, "de"), tmp_path)
    deepl, deepl_translator = fakes("deepl")
    chat, chat_translator = fakes("openai")
    _fail_with(deepl, 456, {"message": "Quota exceeded"})
    _fail_with(chat, 429, {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                                     "code": "insufficient_quota"}})
    for translator in (deepl_translator, chat_translator):
        with pytest.raises(AccountError) as caught:
            tr.translate_document(doc, "en", translator)
        assert caught.value.error_class == "quota"


def test_deepl_529_is_a_rate_limit_not_a_server_error(fakes, tmp_path):
    deepl, translator = fakes("deepl", overloaded=1)
    with pytest.raises(RateLimitError) as caught:
        tr.translate_document(document(make_transcript(56, "de"), tmp_path), "en", translator)
    assert caught.value.status == 529


def test_microsoft_403001_says_the_free_quota_is_used_up(fakes, tmp_path):
    _, translator = fakes("microsoft", free_quota_used=True)
    with pytest.raises(AccountError) as caught:
        tr.translate_document(document(make_transcript(57, "de"), tmp_path), "en", translator)
    assert caught.value.error_class == "quota" and "quota" in str(caught.value)
    assert "key was rejected" not in str(caught.value)


def test_wrong_key_is_an_account_error_without_the_key(provider, tmp_path):
    _, translator = provider
    wrong = type(translator)(api_key=CANARY, base_url=translator.base_url)
    with pytest.raises(AccountError) as caught:
        tr.translate_document(document(make_transcript(54, "de"), tmp_path), "en", wrong)
    assert caught.value.error_class == "auth" and CANARY not in str(caught.value)


def test_invalid_body_is_retryable(provider, tmp_path):
    fake, translator = provider
    fake.server.fault = lambda request: Fault("garbage")
    with pytest.raises(RetryableError) as caught:
        tr.translate_document(document(make_transcript(55, "de"), tmp_path), "en", translator)
    assert caught.value.error_class == "invalid_response"


# -- sources ------------------------------------------------------------------------------
def test_load_source_reads_txt_srt_vtt_and_detects_language(tmp_path):
    (tmp_path / "a.txt").write_text("speaker_0: Ich war damals sehr jung.\n\nspeaker_1: Und dann?\n"
                                    "Ohne Sprecher.\n", encoding="utf-8")
    doc = tr.load_source(tmp_path / "a.txt")
    assert [(u.speaker, u.text) for u in doc.units] == [("speaker_0", "Ich war damals sehr jung."),
                                                        ("speaker_1", "Und dann?"), (None, "Ohne Sprecher.")]
    assert doc.language == "de" and not doc.has_timestamps

    cues = [Cue(1, 0.5, 2.0, "I remember the house\nand the garden."), Cue(2, 2.5, 4.25, "We lived there.")]
    (tmp_path / "b.srt").write_text(format_srt(cues), encoding="utf-8")
    (tmp_path / "b.vtt").write_text(format_vtt(cues, rtl=True), encoding="utf-8")
    for name in ("b.srt", "b.vtt"):
        doc = tr.load_source(tmp_path / name)
        assert [(u.start, u.end, u.text) for u in doc.units] == [
            (0.5, 2.0, "I remember the house and the garden."), (2.5, 4.25, "We lived there.")]
        assert doc.language == "en" and doc.has_timestamps


def test_load_source_json_without_segments_or_language(tmp_path):
    long_line = " ".join(make_sentence(random.Random(k), "en", k) for k in range(40))
    payload = {"text": long_line, "language": None, "segments": [], "has_timestamps": False}
    doc = tr.load_source(write_json(tmp_path, payload))
    assert doc.language == "en" and len(doc.units) > 1
    assert all(len(u.text) <= tr.MAX_UNIT_CHARS for u in doc.units)
    assert " ".join(u.text for u in doc.units) == long_line
    assert tr.load_source(write_json(tmp_path, {**payload, "language": "German"})).language == "de"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"text": "x", "segments": [5]}'])
def test_bad_transcript_is_a_permanent_error(tmp_path, content):
    (tmp_path / "t.json").write_text(content, encoding="utf-8")
    with pytest.raises(PermanentError) as caught:
        tr.load_source(tmp_path / "t.json")
    assert caught.value.error_class == "bad_source"


def test_detect_language():
    assert tr.detect_language("Ich erinnere mich sehr gut an das Haus meiner Großmutter.") == "de"
    assert tr.detect_language("I remember my grandmother's house very well.") == "en"
    assert tr.detect_language("אני זוכר היטב את הבית של סבתא שלי.") == "he"
    assert tr.detect_language("1938 ... 42") is None


# -- configuration ------------------------------------------------------------------------
def test_choose_translator_order_and_errors():
    env = {"DEEPL_API_KEY": "deepl-key-1234:fx", "MS_TRANSLATOR_KEY": "ms-key-123456"}
    chosen = tr.choose_translator("he", env=env)
    assert chosen.name == "deepl" and chosen.base_url == "https://api-free.deepl.com"
    assert tr.choose_translator("he", env={**env, "VERBATIM_TRANSLATION_PROVIDER_HE": "microsoft"}).name == "microsoft"
    assert tr.choose_translator("en", env={**env, "VERBATIM_TRANSLATION_PROVIDER": "microsoft"}).name == "microsoft"
    assert tr.choose_translator("en", "deepl", env={"DEEPL_API_KEY": "abcdefgh"}).base_url == "https://api.deepl.com"
    chat = tr.choose_translator("en", env={"OPENAI_API_KEY": "sk-abcdef", "VERBATIM_TRANSLATION_MODEL": "llama3"})
    assert (chat.name, chat.model) == ("openai", "llama3")
    assert tr.choose_translator("en", env={"OPENAI_API_KEY": "sk-abcdef"}, model="m2").model == "m2"
    with pytest.raises(ConfigError, match="OPENAI_API_KEY, DEEPL_API_KEY, MS_TRANSLATOR_KEY"):
        tr.choose_translator("he", env={})
    with pytest.raises(ConfigError, match="MS_TRANSLATOR_KEY"):
        tr.choose_translator("he", "microsoft", env={"DEEPL_API_KEY": "abcdefgh"})
    with pytest.raises(ConfigError, match="unknown translation provider"):
        tr.choose_translator("he", "google", env=env)

    assert tr.choose_fallback("he", env, "deepl") is None
    assert tr.choose_fallback("he", {**env, "VERBATIM_TRANSLATION_FALLBACK_HE": "microsoft"}, "deepl").name == "microsoft"
    assert tr.choose_fallback("he", {**env, "VERBATIM_TRANSLATION_FALLBACK": "deepl"}, "deepl") is None


def test_a_language_the_provider_lacks_goes_to_the_fallback_or_is_refused():
    env = {"MS_TRANSLATOR_KEY": "ms-abcdef", "DEEPL_API_KEY": "abcdefgh", "OPENAI_API_KEY": "sk-abcdef"}
    with pytest.raises(ConfigError, match="microsoft cannot translate into Yiddish"):
        tr.choose_translator("yi", "microsoft", env=env)
    with pytest.raises(ConfigError, match="deepl cannot translate into Yiddish"):
        tr.choose_translator("yi", env={**env, "VERBATIM_TRANSLATION_PROVIDER": "deepl"})
    routed = tr.choose_translator("yi", env={**env, "VERBATIM_TRANSLATION_PROVIDER": "microsoft",
                                             "VERBATIM_TRANSLATION_FALLBACK_YI": "openai"})
    assert routed.name == "openai"
    # chosen by key order, a provider without the language is passed over; none left: refused
    no_chat = {"DEEPL_API_KEY": "abcdefgh", "MS_TRANSLATOR_KEY": "ms-abcdef"}
    with pytest.raises(ConfigError, match="Yiddish"):
        tr.choose_translator("yi", env=no_chat)
    assert tr.choose_translator("he", env=no_chat).name == "deepl"
    assert tr.choose_translator("he", "microsoft", env=env).name == "microsoft"
    assert tr.choose_fallback("yi", {**env, "VERBATIM_TRANSLATION_FALLBACK": "deepl"}, "openai") is None


def test_translators_are_shared_by_threads(fakes, tmp_path):
    _, deepl_translator = fakes("deepl")
    _, chat_translator = fakes("openai")
    docs = [tr.load_source(write_json(tmp_path, make_transcript(60 + n, "de", 5), f"t{n}.json")) for n in range(16)]
    jobs = [(doc, target, translator) for doc in docs for target in ("en", "he")
            for translator in (deepl_translator, chat_translator)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: tr.translate_document(*job), jobs))
    for (doc, target, _), result in zip(jobs, results):
        assert [u.text for u in result.units] == [fake_translate(u.text, target) for u in doc.units]


# -- the standalone command ---------------------------------------------------------------
def run_cli(args, env_extra: dict, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), **env_extra}
    return subprocess.run([sys.executable, str(REPO / "translation.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_translates_to_stdout_without_leaking_the_key(fakes, tmp_path):
    payload = make_transcript(71, "de", 6)
    path = write_json(tmp_path, payload)
    deepl, _ = fakes("deepl", key=CANARY)
    chat, _ = fakes("openai")
    # The first request gets a 500: the standalone command, having no runner, retries it itself.
    failed = []
    deepl.server.fault = lambda r: None if failed else failed.append(1) or Fault("status", 500, {"message": "x"},
                                                                                   {"Retry-After": "0"})
    ok = run_cli([str(path), "--to", "he", "--format", "srt", "-v"], deepl.env(), tmp_path)
    bad = run_cli([str(path), "--to", "en", "--provider", "openai", "-v"],
                  {**chat.env(), "OPENAI_API_KEY": CANARY}, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert deepl.server.count() == 2
    cues = parse_srt(ok.stdout)
    assert [(c.start, c.end) for c in cues] == [(s["start"], s["end"]) for s in payload["segments"]]
    assert [c.text.strip(RLE + PDF) for c in cues] == [fake_translate(s["text"], "he") for s in payload["segments"]]
    assert bad.returncode == 2 and bad.stdout == ""
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "openai: the API key was rejected" in errors[0]
    for output in (ok.stdout, ok.stderr, bad.stdout, bad.stderr):
        assert CANARY not in output


def test_cli_exit_codes(fakes, tmp_path):
    path = write_json(tmp_path, make_transcript(72, "de", 4))
    txt = tmp_path / "t.txt"
    txt.write_text("Ich war sehr jung.\n", encoding="utf-8")
    ms, _ = fakes("microsoft", wrong_language=True)
    deepl, _ = fakes("deepl")
    wrong = run_cli([str(path), "--to", "he", "--provider", "microsoft"], ms.env(), tmp_path)
    rescued = run_cli([str(path), "--to", "he", "--format", "json"],
                      {**ms.env(), **deepl.env(), "VERBATIM_TRANSLATION_PROVIDER": "microsoft",
                       "VERBATIM_TRANSLATION_FALLBACK_HE": "deepl"}, tmp_path)
    no_timestamps = run_cli([str(txt), "--to", "en", "--from", "de", "--format", "vtt"], deepl.env(), tmp_path)
    unconfigured = run_cli([str(path), "--to", "he"], {}, tmp_path)
    assert wrong.returncode == 1 and wrong.stderr.strip().splitlines()[-1] == \
        "error: microsoft: output is English, not Hebrew"
    assert rescued.returncode == 0 and json.loads(rescued.stdout)["provider"] == "deepl"
    assert no_timestamps.returncode == 2 and "timestamps" in no_timestamps.stderr
    assert unconfigured.returncode == 2 and "DEEPL_API_KEY" in unconfigured.stderr


def test_cli_help_has_an_example():
    result = subprocess.run([sys.executable, str(REPO / "translation.py"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "example:" in result.stdout and "--to" in result.stdout
