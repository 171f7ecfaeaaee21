"""The synthetic world's relevance function, saved beside its data and loaded from it.

The formula, and how the generator draws each term, is in :mod:`recdistill.data.synthetic`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from recdistill.data.tables import rows_of_ids
from recdistill.layout import DataLayout


@dataclass(frozen=True)
class GroundTruth:
    """The generator's relevance function, loadable from a synthetic data directory."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    user_popularity_weight: np.ndarray
    item_log_popularity: np.ndarray
    user_region: np.ndarray  # index into synthetic_world.REGIONS
    region_genre: np.ndarray  # [regions, genres]
    item_genre_weights: np.ndarray  # g_i, [items, genres]
    item_leads_to: np.ndarray  # a_i, [items, sequence_dim]
    item_follows: np.ndarray  # b_i, [items, sequence_dim]
    user_sequence_state: np.ndarray  # s_u after the user's whole generated sequence
    feature_interaction: float
    sequence_weight: float
    sequence_decay: float

    @classmethod
    def load(cls, directory: Path) -> GroundTruth:
        path = DataLayout(Path(directory)).truth_tensors
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: only synthetic data directories carry a ground truth"
            )
        tensors = load_file(str(path))
        names = [field.name for field in dataclasses.fields(cls)]  # scalars: 0-d tensors
        missing = [name for name in names if name not in tensors]
        if missing:
            raise ValueError(
                f"{path} lacks {missing}: written by an older generator, regenerate the data "
                "with `recdistill data synthetic`"
            )
        return cls(
            **{
                name: tensors[name] if tensors[name].ndim else float(tensors[name])
                for name in names
            }
        )

    def save(self, directory: Path) -> None:
        save_file(
            {
                field.name: np.asarray(getattr(self, field.name))
                for field in dataclasses.fields(self)
            },
            str(DataLayout(Path(directory)).truth_tensors),
        )

    def relevance(
        self,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        sequence_state: np.ndarray | None = None,
    ) -> np.ndarray:
        """True relevance of (user, item) pairs, external IDs; the two arrays broadcast.

        The sequence term uses each user's state after all their data, unless
        ``sequence_state`` (``[..., sequence_dim]``, broadcasting with the pairs, e.g. one
        :meth:`sequence_state`) says which history to score after.
        """
        users = rows_of_ids(self.user_ids, user_ids, "the synthetic world's users")
        items = rows_of_ids(self.item_ids, item_ids, "the synthetic world's items")
        if sequence_state is None:
            sequence_state = self.user_sequence_state[users]
        regional = self.region_genre[self.user_region[users]]
        return (
            _dot(self.user_factors[users], self.item_factors[items])
            + self.user_popularity_weight[users] * self.item_log_popularity[items]
            + self.feature_interaction * _dot(regional, self.item_genre_weights[items])
            + self.sequence_weight * _dot(np.asarray(sequence_state), self.item_follows[items])
        )

    def sequence_state(self, item_ids_newest_first: np.ndarray) -> np.ndarray:
        """The state ``s`` after one user's history of external item IDs, newest first."""
        items = rows_of_ids(
            self.item_ids, np.ravel(item_ids_newest_first), "the synthetic world's items"
        )
        decay = self.sequence_decay ** np.arange(len(items), dtype=np.float32)
        return decay @ self.item_leads_to[items]


def _dot(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return np.einsum("...d,...d->...", left, right)
