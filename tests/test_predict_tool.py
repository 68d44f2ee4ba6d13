"""tools.predict (make predict) around the model, with a stand-in for it: an OUT that is not its CSV is refused before
anything is scored, file names of any bytes reach the CSV and the terminal whole and harmless, a cell a spreadsheet
would run is quoted, and the files are read and scored in chunks the model takes."""

import csv
import io
import os
import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from medgemma_breakhis.core.errors import ExpectedError
from medgemma_breakhis.data.breakhis import CLASS_NAMES
from medgemma_breakhis.evaluate.metrics import PROBABILITY_COLUMNS
from medgemma_breakhis.registry.model import OUTPUT_COLUMNS, decode_image
from tools import predict

REPO = Path(__file__).resolve().parents[1]


def png(size: tuple[int, int] = (700, 460)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (230, 200, 215)).save(buffer, format="PNG")
    return buffer.getvalue()


class StandIn:
    """The model's predict: what tools.predict sends it, and a row per image as the classifier answers (an image it
    cannot read refused with decode_image's reason)."""

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []

    def __call__(self, images: pd.DataFrame) -> pd.DataFrame:
        self.calls.append(list(images["image"]))
        scored = {**dict.fromkeys(PROBABILITY_COLUMNS, 1 / 8), "malignant_probability": 0.5}
        scored |= {"predicted_class": CLASS_NAMES[0], "predicted_binary": "malignant", "error": ""}
        rows = []
        for data in images["image"]:
            try:
                decode_image(data)
                rows.append(scored)
            except ExpectedError as err:
                rows.append({"error": str(err)})
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS, dtype=object).assign(warning="")


@pytest.fixture
def model(stage_folder: Path, monkeypatch: pytest.MonkeyPatch) -> StandIn:
    shutil.copy(REPO / "params.yaml", stage_folder)
    stand_in = StandIn()
    monkeypatch.setattr(predict, "load_model", lambda choice, overrides: (stand_in, "the stand-in"))
    return stand_in


def test_an_earlier_csv_of_the_tool_is_overwritten(stage_folder: Path, model: StandIn) -> None:
    (stage_folder / "a.png").write_bytes(png())
    out = stage_folder / "reports" / "new.csv"
    predict.main([str(stage_folder / "a.png"), "--out", str(out)])
    predict.main([str(stage_folder / "a.png"), str(stage_folder / "a.png"), "--out", str(out)])
    assert len(pd.read_csv(out)) == 2


@pytest.mark.parametrize("out", ["mlflow.db", "params.yaml", "folder", "params.yaml/x.csv", "/proc/x.csv"])
def test_an_out_that_is_not_a_csv_of_the_tool_is_refused_in_one_line_before_anything_is_scored(
    stage_folder: Path, model: StandIn, out: str
) -> None:
    sqlite3.connect(stage_folder / "mlflow.db").execute("create table if not exists runs (id text)").connection.commit()
    (stage_folder / "folder").mkdir()
    (stage_folder / "a.png").write_bytes(png())
    before = {path: path.read_bytes() for path in stage_folder.iterdir() if path.is_file()}
    with pytest.raises(ExpectedError) as refused:
        predict.main([str(stage_folder / "a.png"), "--out", out])
    assert str(refused.value).startswith(f"OUT {out} ") and "\n" not in str(refused.value), refused.value
    assert not model.calls, "an image was scored"
    assert {path: path.read_bytes() for path in stage_folder.iterdir() if path.is_file()} == before


def test_a_file_name_of_any_bytes_is_written_and_printed_with_every_other_row(
    stage_folder: Path, model: StandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = stage_folder / "new"
    folder.mkdir()
    names = [b"slide-\xff\xfe.png", "lame\u0301.png".encode(), b"plain.png", b"broken-\xe9.png"]
    for name in names:
        Path(os.fsdecode(bytes(folder) + b"/" + name)).write_bytes(b"not an image" if b"broken" in name else png())
    out = stage_folder / "out.csv"
    with pytest.raises(SystemExit) as exited:
        predict.main([str(folder), "--out", str(out)])
    assert exited.value.code == predict.REFUSED_EXIT_STATUS
    written = pd.read_csv(out, keep_default_na=False)
    assert sorted(Path(file).name for file in written["file"]) == [
        "broken-\\xe9.png",
        "lame\u0301.png",
        "plain.png",
        "slide-\\xff\\xfe.png",
    ]
    assert (written["error"] != "").sum() == 1
    printed = capsys.readouterr()
    assert "slide-\\xff\\xfe.png" in printed.out and "refused " in printed.err and "broken-\\xe9.png" in printed.err


def test_names_are_printed_without_terminal_escapes(
    stage_folder: Path, model: StandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = stage_folder / "new"
    folder.mkdir()
    for name in ("\x1b[2J\x1b[Hrefused nothing. ALL CLEAR.png", "x.png\nwarning spoofed.png", "fine.png"):
        (folder / name).write_bytes(b"not an image" if name != "fine.png" else png())
    with pytest.raises(SystemExit):
        predict.main([str(folder), "--out", "out.csv"])
    printed = capsys.readouterr()
    for stream in (printed.out, printed.err):
        assert "\x1b" not in stream and "spoofed.png\n" not in stream
    assert "\\x1b[2J\\x1b[Hrefused nothing. ALL CLEAR.png: not an image" in printed.err
    assert "x.png\\nwarning spoofed.png: not an image" in printed.err
    assert len(printed.err.splitlines()) == 2  # a line per refused file, none forged


def test_a_cell_starting_like_a_formula_is_written_after_a_quote(
    stage_folder: Path, model: StandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ['=HYPERLINK("e.x","x").png', "+1.png", "-2+3.png", "@SUM(A1).png", "plain.png"]
    for name in names[:-1]:
        Path(name).write_bytes(png())
    with pytest.raises(SystemExit):  # plain.png is missing
        predict.main(["--out", "out.csv", "--", *names, "=1+1"])
    with Path("out.csv").open(encoding="utf-8") as written:
        cells = [row["file"] for row in csv.DictReader(written)]
    assert cells == [f"'{name}" for name in names[:-1]] + ["plain.png", "'=1+1"]
    assert pd.read_csv("out.csv")["error"].fillna("").tolist()[-2:] == ["no such file or folder"] * 2
    assert names[0] in capsys.readouterr().out  # the terminal shows the name as it is


def test_files_are_read_and_scored_in_chunks_of_at_most_the_bytes_one_call_takes(
    stage_folder: Path, model: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = png()
    monkeypatch.setattr(predict.classifier, "MAX_REQUEST_BYTES", 3 * len(image))
    folder = stage_folder / "new"
    folder.mkdir()
    for index in range(7):
        (folder / f"{index}.png").write_bytes(image)
    (folder / "large.png").write_bytes(image * 4)
    with pytest.raises(SystemExit):
        predict.main([str(folder), "--out", "out.csv"])
    assert [len(call) for call in model.calls] == [3, 3, 1]
    refused = pd.read_csv("out.csv", keep_default_na=False).set_index("file")["error"]
    assert refused[str(folder / "large.png")].endswith(" MiB read here"), refused
