import pytest

from recdistill.errors import DataFormatError
from recdistill.impressions import JsonLinesLog, read_log


def test_the_log_reads_back_what_was_appended(tmp_path):
    log = JsonLinesLog(tmp_path / "log" / "impressions.jsonl")
    for number in range(3):
        log.append({"request_id": str(number), "items": [number, number + 1]})
    log.close()
    again = JsonLinesLog(tmp_path / "log" / "impressions.jsonl")
    again.append({"request_id": "3", "items": []})
    again.close()
    impressions = read_log(tmp_path / "log" / "impressions.jsonl")
    assert [i["request_id"] for i in impressions] == ["0", "1", "2", "3"]
    assert impressions[1]["items"] == [1, 2]


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "impressions.jsonl"
    path.write_bytes(b'{"request_id": "a"}\n{"request_id": "b"}\n{"request_id": "c", "ite')
    with pytest.warns(UserWarning, match=r"impressions.jsonl line 3: torn last line \(24 bytes"):
        impressions = read_log(path)
    assert [i["request_id"] for i in impressions] == ["a", "b"]


def test_a_bad_line_before_the_last_names_the_file_and_line(tmp_path):
    path = tmp_path / "impressions.jsonl"
    path.write_bytes(b'{"request_id": "a"}\n{"request_id": \n{"request_id": "c"}\n')
    with pytest.raises(DataFormatError, match=r"impressions.jsonl line 2: not a JSON record"):
        read_log(path)
    path.write_bytes(b'{"request_id": "a"}\n[1, 2]\n')
    with pytest.raises(DataFormatError, match="line 2"):
        read_log(path)


def test_an_empty_log_has_no_impressions(tmp_path):
    (tmp_path / "impressions.jsonl").write_bytes(b"")
    assert read_log(tmp_path / "impressions.jsonl") == []
