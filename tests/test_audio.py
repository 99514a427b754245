"""pipeline.audio against real ffmpeg on generated media: probing, compacting, splitting, bad input."""

from __future__ import annotations

import os

import pytest

from benchmarks import mediagen
from pipeline import audio
from pipeline.errors import PermanentError
from tests.fake_stt import analyse, decode_pcm

GAPS = [(3.0, 4.0), (7.0, 8.0)]  # the silences in tones.wav


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    files = {
        "tones.wav": lambda p: mediagen.make_tones_with_gaps(p, [(440, 3), (880, 3), (660, 3)], gap=1.0),
        "tone.mp3": lambda p: mediagen.make_tone(p, 440, 3),
        "tone.ogg": lambda p: mediagen.make_tone(p, 440, 3, bitrate="12k"),  # already compact
        "tone.wav": lambda p: mediagen.make_tone(p, 330, 3),
        "long.wav": lambda p: mediagen.make_tone(p, 440, 8),
        "video.mp4": lambda p: mediagen.make_video(p, 550, 3),
        "noaudio.mp4": lambda p: mediagen.make_video_without_audio(p),
        "empty.mp3": mediagen.make_empty,
        "text.mp3": mediagen.make_text_as_audio,
    }
    for name, make in files.items():
        make(folder / name)
    paths = {name: str(folder / name) for name in files}
    paths["truncated.mp4"] = str(mediagen.make_truncated(paths["video.mp4"], folder / "truncated.mp4"))
    return paths


def words_in(path) -> list[str]:
    with open(path, "rb") as handle:
        return [run.text for run in analyse(decode_pcm(handle.read()))]


def test_ffmpeg_path_is_found_once():
    assert audio.ffmpeg_path() is audio.ffmpeg_path()
    assert os.access(audio.ffmpeg_path(), os.X_OK)


@pytest.mark.parametrize("name, codec, has_video, seconds", [
    ("tones.wav", "pcm_s16le", False, 11.0),
    ("tone.mp3", "mp3", False, 3.0),
    ("video.mp4", "aac", True, 3.0),
])
def test_probe(media, name, codec, has_video, seconds):
    info = audio.probe(media[name])
    assert info.audio_codec == codec and info.has_audio
    assert info.has_video is has_video
    assert info.duration == pytest.approx(seconds, abs=0.1)
    assert info.size == os.path.getsize(media[name])


def test_probe_describes_a_silent_video(media):
    info = audio.probe(media["noaudio.mp4"])
    assert info.has_video and not info.has_audio and info.audio_codec is None


def test_wav_is_reencoded_smaller(media, tmp_path):
    [chunk] = audio.prepare(media["tones.wav"], tmp_path)
    assert os.path.dirname(chunk.path) == str(tmp_path)
    assert os.path.getsize(chunk.path) < os.path.getsize(media["tones.wav"]) / 4
    assert audio.probe(chunk.path).audio_codec == "opus"
    assert (chunk.offset, chunk.duration) == (0.0, pytest.approx(11.0, abs=0.05))
    assert words_in(chunk.path) == ["tone440 tone440 tone440.", "tone880 tone880 tone880.",
                                    "tone660 tone660 tone660."]


def test_compact_original_is_used_as_it_is(media, tmp_path):
    [chunk] = audio.prepare(media["tone.ogg"], tmp_path)
    assert chunk.path == str(tmp_path / "original.ogg")
    assert os.path.realpath(chunk.path) == os.path.realpath(media["tone.ogg"])
    assert chunk.duration == pytest.approx(3.0, abs=0.05)


def test_mp3_is_prepared(media, tmp_path):
    [chunk] = audio.prepare(media["tone.mp3"], tmp_path)
    assert chunk.path.startswith(str(tmp_path))
    assert words_in(chunk.path) == ["tone440 tone440 tone440."]


def test_audio_track_is_extracted_from_video(media, tmp_path):
    [chunk] = audio.prepare(media["video.mp4"], tmp_path)
    info = audio.probe(chunk.path)
    assert info.has_audio and not info.has_video and info.audio_codec == "opus"
    assert words_in(chunk.path) == ["tone550 tone550 tone550."]


def assert_cuts_in_silences(chunks, total):
    for chunk in chunks[1:]:
        assert any(start <= chunk.offset <= end for start, end in GAPS), chunk
    for before, after in zip(chunks, chunks[1:]):
        assert before.offset + before.duration == pytest.approx(after.offset, abs=0.001)
    assert chunks[-1].offset + chunks[-1].duration == pytest.approx(total, abs=0.05)


def test_split_by_length_cuts_in_silences(media, tmp_path):
    chunks = audio.prepare(media["tones.wav"], tmp_path, max_chunk_seconds=5)
    assert [c.offset for c in chunks] == [0.0, pytest.approx(3.5, abs=0.03), pytest.approx(7.5, abs=0.03)]
    assert all(c.duration <= 5 for c in chunks)
    assert_cuts_in_silences(chunks, 11.0)
    assert [words_in(c.path) for c in chunks] == [["tone440 tone440 tone440."], ["tone880 tone880 tone880."],
                                                  ["tone660 tone660 tone660."]]


def test_split_by_size_cuts_in_silences(media, tmp_path):
    chunks = audio.prepare(media["tones.wav"], tmp_path, max_upload_bytes=25000)
    assert len(chunks) == 3
    assert all(os.path.getsize(c.path) <= 25000 for c in chunks)
    assert_cuts_in_silences(chunks, 11.0)


def test_split_without_silence_cuts_hard_at_the_limit(media, tmp_path):
    chunks = audio.prepare(media["long.wav"], tmp_path, max_chunk_seconds=3)
    assert [c.offset for c in chunks] == [0.0, pytest.approx(2.9, abs=0.03), pytest.approx(5.8, abs=0.03)]
    assert all(c.duration <= 3 for c in chunks)
    assert sum(c.duration for c in chunks) == pytest.approx(8.0, abs=0.05)


@pytest.mark.parametrize("silences, limit, cuts", [
    ([], 20, []),                                       # fits: no cut
    ([(2.0, 3.0), (5.0, 6.0), (12.0, 13.0)], 10, [5.5]),  # nearest silence below the limit
    ([(9.5, 11.0)], 10, [10.0]),                        # a silence across the limit: cut at the limit
    ([(0.2, 0.5)], 10, [10.0]),                         # too close to the start: hard cut
    ([], 7, [7.0, 14.0]),                               # no silence at all: hard cuts
])
def test_plan_cuts(silences, limit, cuts):
    assert audio.plan_cuts(15.0, silences, limit) == cuts


def test_parse_silences_closes_a_trailing_silence():
    log = "[silencedetect] silence_start: 1.5\n[silencedetect] silence_end: 2.25 | silence_duration: 0.75\n" \
          "[silencedetect] silence_start: 9.1\n"
    assert audio.parse_silences(log, 10.0) == [(1.5, 2.25), (9.1, 10.0)]


@pytest.mark.parametrize("name, error_class", [
    ("empty.mp3", "empty_file"),
    ("text.mp3", "unsupported_media"),
    ("truncated.mp4", "unsupported_media"),
    ("noaudio.mp4", "no_audio"),
    ("missing.wav", "not_found"),
])
def test_bad_input_is_refused_clearly(media, tmp_path, name, error_class):
    path = media.get(name, str(tmp_path / name))
    with pytest.raises(PermanentError) as caught:
        audio.prepare(path, tmp_path / "work")
    assert caught.value.error_class == error_class
    assert os.path.basename(path) in str(caught.value)


@pytest.mark.parametrize("name", [b"-", b"-i.wav", b"line\nbreak.wav", b"caf\xe9 latin-1.wav",
                                  b"  spaces  .wav", b"http:not-a-url.wav", b"100%d.wav"])
def test_odd_file_names(media, tmp_path, name):
    source_dir = tmp_path / "in"
    source_dir.mkdir()
    path = os.path.join(os.fsencode(source_dir), name)
    mediagen.copy_to(media["tone.wav"], path)
    work = tmp_path / "work"
    work.mkdir()
    [chunk] = audio.prepare(path, work)
    assert chunk.duration == pytest.approx(3.0, abs=0.05)
    assert words_in(chunk.path) == ["tone330 tone330 tone330."]
    assert os.listdir(os.fsencode(source_dir)) == [name]  # nothing written next to the input


def test_odd_name_kept_as_original(media, tmp_path):
    path = os.path.join(os.fsencode(tmp_path), b"-\xff\n.ogg")
    mediagen.copy_to(media["tone.ogg"], path)
    work = tmp_path / "work"
    work.mkdir()
    [chunk] = audio.prepare(path, work)
    assert chunk.path == str(work / "original.ogg")
    assert words_in(chunk.path) == ["tone440 tone440 tone440."]


def test_refusal_of_an_odd_name_is_one_line(media, tmp_path):
    path = os.path.join(os.fsencode(tmp_path), b"notes\n\xff.mp3")
    mediagen.copy_to(media["text.mp3"], path)
    with pytest.raises(PermanentError) as caught:
        audio.prepare(path, tmp_path)
    assert caught.value.error_class == "unsupported_media"
    assert "\n" not in str(caught.value) and "notes\\n\\xff.mp3" in str(caught.value)  # as the job store shows it
