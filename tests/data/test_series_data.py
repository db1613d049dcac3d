"""Time series files and datasets (issue 19): each file format reads, a series that is too
long or holds NaN is a bad sample with its reason, aeon's bundled sets read by name, and the
encoder sizes are taken from the training data."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from polymodal.config import DatasetConfig, EncoderConfig, from_dict
from polymodal.data.aeon import AeonOptions, forecast_values
from polymodal.data.datasets import read_dataset
from polymodal.data.errors import DataError
from polymodal.data.series import SeriesOptions
from polymodal.data.series_records import choose_decimals, format_values, parse_values
from polymodal.data.validate import check_samples
from polymodal.encoders.base import Encoder
from polymodal.errors import ConfigError, UserError
from polymodal.processing.series import pad_series, read_series
from polymodal.train import fit_sizes

TS_FILE = """# two channels of four steps, two classes; the third series has a missing value
@problemName Tiny
@timeStamps false
@missing true
@univariate false
@dimensions 2
@equalLength true
@seriesLength 4
@classLabel true up down
@data
1,2,3,4:4,3,2,1:up
4,3,2,1:1,2,3,4:down
1,NaN,3,4:1,1,1,1:up
"""


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Series written from dataset files go under this test's folder."""
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------- one series file


def test_npy_of_one_channel_and_of_several_read_channels_first(tmp_path):
    np.save(tmp_path / "one.npy", np.arange(5.0))
    np.save(tmp_path / "three.npy", np.arange(12.0).reshape(4, 3))  # [T, C]
    one, three = read_series(tmp_path / "one.npy"), read_series(tmp_path / "three.npy")
    assert one.dtype == torch.float32 and one.tolist() == [[0, 1, 2, 3, 4]]
    assert three.shape == (3, 4) and three[1].tolist() == [1, 4, 7, 10]


def test_csv_with_and_without_a_header_row(tmp_path):
    (tmp_path / "named.csv").write_text("x,y\n1,2\n3,4\n5,6\n")
    (tmp_path / "plain.csv").write_text("1,2\n3,4\n5,6\n")
    expected = [[1, 3, 5], [2, 4, 6]]
    assert read_series(tmp_path / "named.csv").tolist() == expected
    assert read_series(tmp_path / "plain.csv").tolist() == expected


@pytest.mark.parametrize("name, content, message", [
    ("nan.csv", "1,2\n3,nan\n", "nan.csv: has NaN at step 1 of channel 1"),
    ("word.csv", "1,2\n3,abc\n", "'abc' at step 1 of channel 1 is not a number"),
    ("ragged.csv", "1,2\n3\n", "step 1 has 1 values, the first has 2"),
    ("empty.csv", "a,b\n", "empty"),
])
def test_a_bad_csv_is_a_user_error_naming_the_file_and_place(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=message):
        read_series(tmp_path / name)


def test_bad_arrays_and_files_are_user_errors_naming_them(tmp_path):
    np.save(tmp_path / "inf.npy", np.array([[1.0, 2.0], [np.inf, 0.0]]))
    np.save(tmp_path / "four_axes.npy", np.zeros((1, 1, 2, 2)))
    np.save(tmp_path / "many.npy", np.zeros((3, 4, 2)))
    (tmp_path / "pickle.npy").write_bytes(b"not numpy")
    cases = {tmp_path / "missing.npy": "series file not found", tmp_path / "inf.npy": "inf at step 1 of channel 0",
             tmp_path / "four_axes.npy": "has 4 axes", tmp_path / "many.npy": "holds 3 series",
             tmp_path / "pickle.npy": "not a numpy .npy file", tmp_path / "x.ts": "series file not found"}
    for path, message in cases.items():
        with pytest.raises(UserError, match=message):
            read_series(path)
    with pytest.raises(UserError, match="the series sent: not numeric"):
        read_series(np.array(["a", "b"]))


def test_pad_series_pads_on_the_left_with_nan_crops_a_long_one_and_refuses_too_many_channels():
    series = torch.tensor([[1.0, 2.0, 3.0]])
    padded = pad_series(series, channels=2, length=5)
    assert padded.shape == (2, 5)
    assert padded[0, 2:].tolist() == [1, 2, 3]  # the latest step stays last
    assert torch.isnan(padded[0, :2]).all() and torch.isnan(padded[1]).all()
    assert pad_series(series, 1, 2).tolist() == [[2, 3]]  # the last 2 steps: a fixed lookback
    with pytest.raises(UserError, match="series of 2 channels has more than the encoder's 1"):
        pad_series(torch.zeros(2, 3), 1, 5)
    with pytest.raises(UserError, match="channels and length are 0"):
        pad_series(series, 0, 5)


# ---------------------------------------------------------------- dataset formats


def test_jsonl_manifest_of_labels_and_of_futures(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(6.0).reshape(3, 2))
    (tmp_path / "b.csv").write_text("10\n20\n30\n")
    np.save(tmp_path / "b_next.npy", np.array([40.0, 50.0]))
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in [
        {"series": "a.npy", "label": "walking", "question": "What activity is this?"},
        {"id": "b", "series": "b.csv", "future": [41.5, 52.25]},
        {"series": "b.csv", "future": "b_next.npy"},
    ]) + "\n")
    first, second, third = read_dataset(SeriesOptions(path=str(manifest)))
    assert first.messages == [{"role": "user", "content": "<series>\nWhat activity is this?"},
                              {"role": "assistant", "content": "walking"}]
    assert first.media == {"series": [str(tmp_path / "a.npy")]} and first.id == "data:1"
    # one number of decimals for the whole file (its futures are ~45: one decimal)
    assert second.id == "b" and second.messages[1]["content"] == "41.5 52.2"
    assert second.messages[0]["content"] == "<series>\nWhat are the next 2 values?"
    assert third.messages[1]["content"] == "40.0 50.0"


def test_malformed_manifest_records_are_bad_samples_and_invalid_json_names_its_line(tmp_path):
    manifest = tmp_path / "data.jsonl"
    manifest.write_text('{"series": "a.npy"}\n["x"]\n{"series": "gone.npy", "label": 1}\n')
    no_answer, not_object, missing = read_dataset(SeriesOptions(path=str(manifest)))
    assert no_answer.problem == "give either 'label' (classification) or 'future' (forecasting)"
    assert not_object.problem == "expected a JSON object, got list" and not_object.where == f"{manifest}:2"
    assert missing.problem.startswith("series file not found")
    manifest.write_text('{"series": "a.npy", "label": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: not valid JSON"):
        read_dataset(SeriesOptions(path=str(manifest)))


def test_ts_file_reads_every_series_and_its_label_and_nan_is_a_bad_sample(tmp_path):
    path = tmp_path / "tiny_TRAIN.ts"
    path.write_text(TS_FILE)
    up, down, holed = read_dataset(SeriesOptions(path=str(path)))
    assert [up.messages[1]["content"], down.messages[1]["content"]] == ["up", "down"]
    assert read_series(up.media["series"][0]).tolist() == [[1, 2, 3, 4], [4, 3, 2, 1]]
    assert up.problem is None and holed.problem == "has NaN at step 1 of channel 0"
    assert holed.where == f"{path}, record 2"
    good = check_samples([up, down, holed], "<image>", tmp_path / "bad.jsonl", max_bad_fraction=0.5)
    assert good == [up, down]
    assert json.loads((tmp_path / "bad.jsonl").read_text())["reason"] == "has NaN at step 1 of channel 0"


def test_too_long_series_and_nan_files_are_bad_samples_with_reasons(tmp_path):
    for label in ("calm", "busy"):
        (tmp_path / "sets" / label).mkdir(parents=True)
    np.save(tmp_path / "sets" / "calm" / "short.npy", np.zeros(8))
    np.save(tmp_path / "sets" / "busy" / "long.npy", np.zeros(20))
    (tmp_path / "sets" / "busy" / "holed.csv").write_text("1\nnan\n")
    holed, long, short = read_dataset(SeriesOptions(path=str(tmp_path / "sets"), max_length=10))
    assert [s.id for s in (holed, long, short)] == ["busy/holed", "busy/long", "calm/short"]
    assert long.problem == "series of 20 steps is longer than max_length 10"
    assert holed.problem.endswith("has NaN at step 1 of channel 0")
    assert short.problem is None and short.messages[1]["content"] == "calm"


def test_a_path_that_is_no_series_dataset_is_a_data_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="not a series dataset"):
        read_dataset(SeriesOptions(path=str(tmp_path / "notes.txt")))
    with pytest.raises(ConfigError, match="path: required"):
        SeriesOptions()


# ---------------------------------------------------------------- aeon's bundled sets


def test_aeon_basic_motions_reads_40_and_40_series_of_6_channels_and_100_steps():
    options = from_dict(DatasetConfig, {"format": "aeon", "name": "BasicMotions", "split": "train"})
    assert isinstance(options, AeonOptions) and options.name == "BasicMotions"
    train = read_dataset(options)
    test = AeonOptions(name="basicmotions", split="test").question_items()
    assert len(train) == 40 and len(test) == 40
    assert read_series(train[0].media["series"][0]).shape == (6, 100)
    assert train[0].messages[0]["content"] == "<series>\nWhat activity is this?"
    labels = {s.messages[1]["content"] for s in train}
    assert labels == {"standing", "running", "walking", "badminton"}
    assert test[0].info["type"] == "class" and test[0].references[0] in labels
    assert test[0].media["series"][0].endswith(".npy")


def test_aeon_airline_windows_split_by_time():
    train, test = (AeonOptions(name="Airline", split=split).question_items() for split in ("train", "test"))
    values = forecast_values("Airline")
    assert len(values) == 144 and len(train) == 68 and len(test) == 18  # 36 steps -> next 12; last 29 held out
    last = test[-1]
    assert last.info["future"] == values[-12:].tolist() and last.info["season"] == 12
    assert last.references == [format_values(values[-12:], 0)] and last.question == "What are the next 12 values?"
    assert read_series(last.media["series"][0])[0].tolist() == values[-48:-12].tolist()
    train_ends = max(int(item.id.split(":")[1]) + 12 for item in train)
    assert train_ends <= min(int(item.id.split(":")[1]) for item in test)  # no future seen in training


def test_an_aeon_name_it_does_not_bundle_lists_the_bundled_ones():
    with pytest.raises(UserError, match=r"not bundled.*BasicMotions.*PickupGestureWiimoteZ.*Airline"):
        AeonOptions(name="ECG200").records()
    with pytest.raises(UserError, match="is a regression set"):
        AeonOptions(name="Covid3Month").records()
    with pytest.raises(ConfigError, match="name: required"):
        AeonOptions()


# ---------------------------------------------------------------- answers as text


def test_values_written_and_read_back_with_decimals_per_set():
    assert format_values([112.0, 118.4, -0.2], 0) == "112 118 0"
    assert format_values([[1.5, 3.0], [1.75, 2.9]], 1) == "1.5,3.0 1.8,2.9"
    assert parse_values("112 118, then -1.5e2 and .5") == [112.0, 118.0, -150.0, 0.5]
    assert [choose_decimals(v) for v in ([300, 420], [45.0], [0.5, 0.4], [0, 0])] == [0, 1, 3, 0]


# ---------------------------------------------------------------- sizes from the data


class FittingEncoder(Encoder):
    """Stands in for a series encoder kind: the largest channel count and length."""

    @classmethod
    def sizes_from_data(cls, config):
        return config.channels == 0 or config.length == 0

    @classmethod
    def fit_to_data(cls, config, series_list):
        return SimpleNamespace(kind=config.kind, channels=max(s.shape[0] for s in series_list),
                               length=max(s.shape[1] for s in series_list))


def test_the_hook_fills_zero_sizes_from_every_stage_and_skips_bad_samples(tmp_path, monkeypatch):
    for label, steps, channels in (("a", 7, 2), ("b", 9, 1), ("c", 50, 3)):
        (tmp_path / "sets" / label).mkdir(parents=True)
        np.save(tmp_path / "sets" / label / "x.npy", np.zeros((steps, channels)))
    ts = tmp_path / "tiny_TRAIN.ts"
    ts.write_text(TS_FILE)
    monkeypatch.setattr(fit_sizes, "ENCODERS", SimpleNamespace(get=lambda kind: SimpleNamespace(builder=FittingEncoder)))
    stages = [SimpleNamespace(data=[SeriesOptions(path=str(tmp_path / "sets"), max_length=20)], validation=None),
              SimpleNamespace(data=[], validation=SimpleNamespace(data=[SeriesOptions(path=str(ts))]))]
    unfitted = SimpleNamespace(kind="fake", channels=0, length=0)
    recipe = SimpleNamespace(model=SimpleNamespace(encoders={"series": unfitted}), stages=stages)
    fit_sizes.fit_encoder_sizes(recipe)
    fitted = recipe.model.encoders["series"]
    assert (fitted.channels, fitted.length) == (2, 9)  # the 50-step series is too long: a bad sample
    recipe.stages = [SimpleNamespace(data=[], validation=None)]
    recipe.model.encoders["series"] = unfitted
    with pytest.raises(ConfigError, match=r"model\.encoders\.series: channels and length 0"):
        fit_sizes.fit_encoder_sizes(recipe)


def test_the_hook_leaves_encoders_without_sizes_from_data_alone():
    vit = EncoderConfig(kind="vit")
    recipe = SimpleNamespace(model=SimpleNamespace(encoders={"image": vit}), stages=[])
    fit_sizes.fit_encoder_sizes(recipe)
    assert recipe.model.encoders["image"] is vit
