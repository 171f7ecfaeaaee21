"""A teacher that cannot teach as given stops the run with one line naming what is wrong
and what was expected: exit 2 from the CLI, a TeacherError from the API, and no run
directory left behind."""

import tomllib

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from onnx import TensorProto, helper

import recdistill
from recdistill.cli import main
from recdistill.config import parse_run_config
from recdistill.errors import TeacherError
from tests.external.conftest import FROM_LOG, SCORES_ONLY, STUDENT, config_with
from tests.external.teachers import BagTeacher, write_vectors, write_weights


def refused(config: str, data, out, match: str, **teachers) -> None:
    """Training ``config`` fails with a TeacherError matching ``match`` and writes nothing."""
    with pytest.raises(TeacherError, match=match):
        recdistill.train(parse_run_config(tomllib.loads(config)), data, out, teachers=teachers)
    assert not out.exists()


def refused_by_cli(config: str, data, tmp_path, capsys, match: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(config)
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--data", str(data), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("recdistill: error: "), error
    assert match in error, error
    assert not out.exists()


class WrongShape(BagTeacher):
    def forward(self, history, history_length, candidates):
        scores = super().forward(history, history_length, candidates)["scores"]
        return torch.cat([scores, scores[:, :1]], dim=1)


class WrongDtype(BagTeacher):
    def forward(self, history, history_length, candidates):
        return super().forward(history, history_length, candidates)["scores"].double()


class WrongInput(BagTeacher):
    def forward(self, history, lengths, candidates):
        return super().forward(history, lengths, candidates)["scores"]


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (WrongShape(), r"output 'scores' has shape \(8, 7\); expected \[B, C\] = \(8, 6\)"),
        (WrongDtype(), r"output 'scores' is float64; the contract gives float32"),
        (WrongInput(), r"unknown input\(s\) \['lengths'\]; the contract's inputs are"),
    ],
    ids=["output shape", "output dtype", "input name"],
)
def test_a_module_that_breaks_the_tensor_form_is_named(synthetic_dir, tmp_path, module, match):
    config = config_with(SCORES_ONLY, 'kind = "torch"')
    refused(config, synthetic_dir, tmp_path / "run", match, outside=module)


def _graph(path, inputs, output="scores", body=None):
    """A small ONNX graph: its int64 ``inputs`` (name: (dtype, shape)), ``scores`` the
    candidates cast to float unless ``body`` says otherwise."""
    nodes = body or [helper.make_node("Cast", ["candidates"], [output], to=TensorProto.FLOAT)]
    graph = helper.make_graph(
        nodes,
        "teacher",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["B", "C"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


CANDIDATES = {"candidates": (TensorProto.INT64, ["B", "C"])}


@pytest.mark.parametrize(
    ("inputs", "output", "match"),
    [
        (
            CANDIDATES | {"history": (TensorProto.FLOAT, ["B", 10])},
            "scores",
            "input 'history' is tensor(float); the contract gives tensor(int64)",
        ),
        (
            CANDIDATES | {"items": (TensorProto.INT64, ["B", 10])},
            "scores",
            "unknown input(s) ['items']; the contract's inputs are",
        ),
        (
            CANDIDATES | {"history": (TensorProto.INT64, ["B", 20])},
            "scores",
            "input 'history' is 20 items wide; the run sends history_length = 10",
        ),
        (
            {"candidates": (TensorProto.INT64, [4, "C"])},
            "scores",
            "input 'candidates' has a fixed batch of 4 lists",
        ),
        (CANDIDATES, "score", "gives no output named 'scores' (it gives ['score'])"),
    ],
    ids=["input dtype", "input name", "history width", "fixed batch", "output name"],
)
def test_an_onnx_graph_that_breaks_the_tensor_form_is_named(
    synthetic_dir, tmp_path, capsys, inputs, output, match
):
    graph = _graph(tmp_path / "bad.onnx", inputs, output)
    config = config_with(SCORES_ONLY, f'kind = "onnx"\npath = "{graph}"')
    refused_by_cli(config, synthetic_dir, tmp_path, capsys, match)


def test_an_onnx_graph_whose_scores_are_not_finite_names_the_lists(synthetic_dir, tmp_path, capsys):
    body = [
        helper.make_node("Cast", ["candidates"], ["ids"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["ids", "ids"], ["ones"]),
        helper.make_node("Sub", ["ones", "ones"], ["zeros"]),
        helper.make_node("Div", ["ids", "zeros"], ["scores"]),
    ]
    graph = _graph(tmp_path / "inf.onnx", CANDIDATES, body=body)
    config = config_with(SCORES_ONLY, f'kind = "onnx"\npath = "{graph}"')
    refused_by_cli(
        config, synthetic_dir, tmp_path, capsys, "gave non-finite scores for 8 of 8 lists: user"
    )


class Unstable:
    """A Python teacher whose scores turn NaN for one user once training asks about them."""

    def score(self, lists):
        scores = np.asarray(lists.candidates, dtype=np.float32) * 1e-3
        scores[np.asarray(lists.users) == 17] = np.nan
        return scores


def test_non_finite_scores_in_training_name_the_lists_and_take_the_run_with_them(
    synthetic_dir, tmp_path
):
    config = config_with(SCORES_ONLY, 'kind = "python"')
    refused(
        config,
        synthetic_dir,
        tmp_path / "run",
        r"non-finite scores for \d+ of \d+ lists: user 17 at",
        outside=Unstable(),
    )


def test_ids_the_teacher_s_vocabulary_does_not_know_are_counted_and_named(synthetic_dir, tmp_path):
    vocabulary = tmp_path / "items.parquet"
    pq.write_table(pa.table({"id": pa.array([None, *range(1, 491)], pa.int64())}), vocabulary)
    weights = write_weights(BagTeacher(), tmp_path / "bag.safetensors")
    table = (
        f'kind = "torch"\nfactory = "tests.external.teachers:build"\nweights = "{weights}"\n'
        f'vocabulary = {{ item_id = "{vocabulary}" }}'
    )
    refused(
        config_with(SCORES_ONLY, table),
        synthetic_dir,
        tmp_path / "run",
        r"does not know 10 of the data's items \(500\), e.g. 491, 492, 493, 494, 495",
    )


def test_weights_that_do_not_fit_the_factory_s_module_are_refused(synthetic_dir, tmp_path):
    weights = write_weights(BagTeacher(dim=4), tmp_path / "bag.safetensors")
    table = f'kind = "torch"\nfactory = "tests.external.teachers:build"\nweights = "{weights}"'
    refused(
        config_with(SCORES_ONLY, table),
        synthetic_dir,
        tmp_path / "run",
        "does not fit tests.external.teachers:build",
    )


def test_embedding_tables_of_another_dimension_are_refused(
    synthetic_dir, snapshots, tmp_path, capsys
):
    items, _ = snapshots
    users = write_vectors(tmp_path / "users.parquet", [1, 2], [0, 0], np.ones((2, 4)), "user_id")
    table = f'kind = "embeddings"\nitems = "{items}"\nusers = "{users}"'
    refused_by_cli(
        config_with(STUDENT, table),
        synthetic_dir,
        tmp_path,
        capsys,
        "item vectors have 8 dimensions, user vectors 4: they must match",
    )


def test_user_snapshots_all_after_the_training_lists_are_refused(
    synthetic_dir, snapshots, tmp_path
):
    items, _ = snapshots
    late = 10**10
    users = write_vectors(
        tmp_path / "users.parquet", [1, 2], [late, late], np.ones((2, 8)), "user_id"
    )
    table = f'kind = "embeddings"\nitems = "{items}"\nusers = "{users}"'
    refused(
        config_with(STUDENT, table),
        synthetic_dir,
        tmp_path / "run",
        f"no user vector is valid before any training list \\(the first valid_from is {late}",
    )


@pytest.mark.parametrize("column", ["user_id", "item_id"])
def test_a_score_log_naming_users_or_items_the_data_lacks_is_refused(
    synthetic_dir, score_log, tmp_path, column
):
    table = pq.read_table(score_log)
    ids = table.column(column).to_numpy().copy()
    ids[:3] = [900_001, 900_002, 900_001]
    log = tmp_path / "log.parquet"
    pq.write_table(table.set_column(table.column_names.index(column), column, pa.array(ids)), log)
    what = "users" if column == "user_id" else "items"
    refused(
        config_with(FROM_LOG, f'kind = "scores"\npath = "{log}"'),
        synthetic_dir,
        tmp_path / "run",
        f"names 2 {what} the data does not have, e.g. 900001, 900002",
    )
