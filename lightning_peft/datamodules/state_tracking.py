"""Synthetic state-tracking data: parity and DFA recognition, seeded and deterministic.

A task is a deterministic finite automaton (DFA) ``delta [S, V]`` (``delta[s, a]`` = the state
after reading symbol ``a`` in state ``s``) with a start state and a set of accepting states, plus
per-state emission probabilities ``p(a | s) [S, V]`` that say how strings are drawn (uniform for
the recognition tasks: symbols are i.i.d. uniform). A string ``a_1..a_n`` is run as
``s_0 = start``, ``s_t = delta[s_{t-1}, a_t]``; it is accepted iff ``s_n`` is accepting.

The built-in tasks are the group-like automata of the state-tracking literature (Tomita 1982;
Deletang et al. 2023, "Neural Networks and the Chomsky Hierarchy"; Liu et al. 2023, "Transformers
Learn Shortcuts to Automata"), chosen because their acceptance rate does not vanish with the
length (1/2 to 1/5 of uniform strings), so balanced sets exist at any length:

================  ==========  ======  =================================================
task              symbols     states  accepted iff
================  ==========  ======  =================================================
``parity``        0, 1        2       the number of 1s is odd
``mod3``          a, b        3       the number of a's is divisible by 3
``tomita5``       0, 1        4       the numbers of 0s and of 1s are both even (Z2 x Z2)
``tomita6``       0, 1        3       (#0 - #1) mod 3 == 0
``cycle5``        +1, -1, 0   5       a walk on a 5-cycle from 0 ends at 0
``pdfa``          a, b, c     4       final state 0; strings drawn from a fixed random
                                      *probabilistic* automaton (state-dependent
                                      emissions): a language to pretrain a base on
``custom``        V           S       your ``transitions`` / ``accept_states``
================  ==========  ======  =================================================

Tokens (shared by every task, so one pretrained base serves all): ``PAD = 0``, ``BOS = 1``,
``EOS = 2``, symbol ``a`` -> ``3 + a``. A row is ``BOS a_1 .. a_n EOS PAD ..`` of width
``max_length + 2`` (right padding), with ``attention_mask`` 1 on the ``n + 2`` real tokens.
Right padding keeps every real token at the same position whatever the batch: a causal model
(attention or a causal convolution such as HRM's) never sees the pads from a real position.

Targets (``target``):

- ``"accept"`` (default): ``labels [B]`` in {0, 1} (1 = accepted), read by a classifier from the
  last real token (``EOS``), which has seen the whole string; sets are balanced 50/50 by
  rejection sampling (``balance``), so chance is 0.5 on every task.
- ``"state"``: ``labels [B, T]`` = the DFA state after each symbol (``s_t`` at the position of
  ``a_t``), ``-100`` on BOS, EOS and padding: a dense per-token signal, for token classifiers.
- ``"next_token"``: causal-LM batches, ``labels = input_ids`` with ``-100`` on padding (the model
  shifts them), for pretraining a base on one language.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from lightning_peft.datamodules.base import SplitDataModule, check_loader_args
from lightning_peft.datamodules.text import _DictDataset
from lightning_peft.validation import InvalidArgumentError, check_bool, check_choice, check_int

PAD, BOS, EOS, SYMBOL_OFFSET = 0, 1, 2, 3
#: Vocabulary that covers every built-in task (3 specials + up to 3 symbols).
STATE_TRACKING_VOCAB_SIZE = SYMBOL_OFFSET + 3

Task = Literal["parity", "mod3", "tomita5", "tomita6", "cycle5", "pdfa", "custom"]
Target = Literal["accept", "state", "next_token"]
TASKS = ("parity", "mod3", "tomita5", "tomita6", "cycle5", "pdfa", "custom")
_SPLITS = {"train": 0, "val": 1, "test": 2}


class DFA:
    """``transitions [S, V]`` (int), ``start``, ``accept`` (accepting states) and the emission
    probabilities ``emissions [S, V]`` (rows sum to 1) that draw strings."""

    def __init__(self, transitions: np.ndarray, accept: list[int], start: int = 0, emissions: np.ndarray | None = None) -> None:
        self.transitions = np.asarray(transitions, dtype=np.int64)
        self.accept = sorted(set(accept))
        self.start = start
        n_states, n_symbols = self.transitions.shape
        self.emissions = np.full((n_states, n_symbols), 1.0 / n_symbols) if emissions is None else np.asarray(emissions, dtype=np.float64)

    @property
    def num_states(self) -> int:
        return self.transitions.shape[0]

    @property
    def num_symbols(self) -> int:
        return self.transitions.shape[1]

    def run(self, symbols: list[int]) -> list[int]:
        """States ``s_1..s_n`` after each symbol, one step at a time (the reference)."""
        state, states = self.start, []
        for a in symbols:
            state = int(self.transitions[state, a])
            states.append(state)
        return states

    def accepts(self, symbols: list[int]) -> bool:
        states = self.run(symbols)
        return (states[-1] if states else self.start) in self.accept


def _pdfa() -> DFA:
    # A fixed random probabilistic automaton (its own seed, independent of the data seed) whose
    # emissions depend on the state: predicting the next symbol needs the hidden state.
    rng = np.random.default_rng(20260602)
    transitions = rng.integers(0, 4, size=(4, 3))
    transitions[0] = [1, 2, 3]  # every state reachable from the start
    emissions = rng.dirichlet(np.full(3, 0.5), size=4)
    return DFA(transitions, accept=[0], emissions=emissions)


def builtin_dfa(task: str) -> DFA:
    """The automaton of a built-in task (see the module docstring's table)."""
    if task == "parity":
        return DFA([[0, 1], [1, 0]], accept=[1])
    if task == "mod3":
        return DFA([[1, 0], [2, 1], [0, 2]], accept=[0])
    if task == "tomita5":  # state = 2 * (#0 odd) + (#1 odd)
        return DFA([[2, 1], [3, 0], [0, 3], [1, 2]], accept=[0])
    if task == "tomita6":  # state = (#0 - #1) mod 3
        return DFA([[1, 2], [2, 0], [0, 1]], accept=[0])
    if task == "cycle5":  # symbols: +1, -1, stay
        return DFA([[(s + 1) % 5, (s - 1) % 5, s] for s in range(5)], accept=[0])
    if task == "pdfa":
        return _pdfa()
    raise ValueError(f"no built-in task {task!r}; choose one of {TASKS[:-1]} or 'custom' with transitions and accept_states.")


def sample_strings(dfa: DFA, n: int, min_length: int, max_length: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """``n`` strings drawn from ``dfa``'s emissions, lengths uniform in ``[min_length, max_length]``.

    Returns ``symbols [n, max_length]`` (``-1`` past each length), ``lengths [n]`` and the
    states ``[n, max_length]`` after each symbol (``-1`` past each length); vectorised over
    ``n``, one step per position.
    """
    lengths = rng.integers(min_length, max_length + 1, size=n)
    cumulative = np.cumsum(dfa.emissions, axis=1)
    cumulative[:, -1] = 1.0 + 1e-9  # rounding: the last symbol always catches u < 1
    uniforms = rng.random((n, max_length))
    symbols = np.full((n, max_length), -1, dtype=np.int64)
    states = np.full((n, max_length), -1, dtype=np.int64)
    state = np.full(n, dfa.start, dtype=np.int64)
    for t in range(max_length):
        live = t < lengths
        symbol = (uniforms[:, t : t + 1] >= cumulative[state]).sum(axis=1)
        state = np.where(live, dfa.transitions[state, symbol], state)
        symbols[:, t] = np.where(live, symbol, -1)
        states[:, t] = np.where(live, state, -1)
    return symbols, lengths, states


def _balanced(dfa: DFA, n: int, min_length: int, max_length: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """``n`` strings, half accepted and half rejected (accepted first when ``n`` is odd), in a
    seeded random order; draws batches of candidates until both halves are full (at most 200
    batches of ``max(2n, 64)``: a class rarer than about 1 in 400 strings is refused)."""
    want = {1: (n + 1) // 2, 0: n // 2}
    kept: dict[int, list[tuple[np.ndarray, ...]]] = {0: [], 1: []}
    have = {0: 0, 1: 0}
    for _ in range(200):
        symbols, lengths, states = sample_strings(dfa, max(2 * n, 64), min_length, max_length, rng)
        final = states[np.arange(len(lengths)), lengths - 1]
        accepted = np.isin(final, dfa.accept).astype(np.int64)
        for label in (0, 1):
            idx = np.flatnonzero(accepted == label)[: want[label] - have[label]]
            kept[label].append((symbols[idx], lengths[idx], states[idx]))
            have[label] += len(idx)
        if have == want:
            break
    else:
        raise ValueError(
            f"could not draw {want[1]} accepted and {want[0]} rejected strings of lengths {min_length}..{max_length}: "
            "this automaton (almost) never accepts or never rejects them; use balance=False or other accept_states."
        )
    parts = [np.concatenate([p[i] for label in (1, 0) for p in kept[label]]) for i in range(3)]
    order = rng.permutation(n)
    return tuple(p[order] for p in parts)


def encode(symbols: np.ndarray, lengths: np.ndarray, states: np.ndarray, dfa: DFA, target: str) -> dict[str, torch.Tensor]:
    """Rows ``BOS a_1..a_n EOS PAD..`` (width ``max_length + 2``), the mask and the labels of
    ``target`` (see the module docstring)."""
    n, width = len(lengths), symbols.shape[1] + 2
    positions = np.arange(width)[None, :]
    real = positions < (lengths[:, None] + 2)
    ids = np.full((n, width), PAD, dtype=np.int64)
    ids[:, 0] = BOS
    body = np.where(symbols >= 0, symbols + SYMBOL_OFFSET, PAD)
    ids[:, 1:-1] = body
    ids[np.arange(n), lengths + 1] = EOS
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(real.astype(np.int64))}
    if target == "accept":
        final = states[np.arange(n), lengths - 1]
        out["labels"] = torch.from_numpy(np.isin(final, dfa.accept).astype(np.int64))
    elif target == "state":
        labels = np.full((n, width), -100, dtype=np.int64)
        labels[:, 1:-1] = np.where(states >= 0, states, -100)
        out["labels"] = torch.from_numpy(labels)
    else:
        out["labels"] = torch.from_numpy(np.where(real, ids, -100))
    return out


class StateTrackingDataModule(SplitDataModule):
    """Parity / DFA recognition (or per-token states, or LM pretraining) on generated strings.

    Each split is drawn from its own seeded stream (``SeedSequence([seed, split])``), so the
    same arguments give the same tensors on every machine, and changing ``train_size`` does not
    change the validation or test sets. Batches are dicts: ``input_ids [B, T]``,
    ``attention_mask [B, T]`` (``T = max_length + 2``) and ``labels`` (``[B]`` for ``"accept"``,
    ``[B, T]`` otherwise). See the module docstring for the tasks and the token layout.

    Args:
        task: a built-in automaton, or ``"custom"`` with ``transitions`` and ``accept_states``.
        target: ``"accept"`` (sequence label), ``"state"`` (per-token DFA states) or
            ``"next_token"`` (causal LM labels).
        min_length: fewest symbols in a string (>= 1).
        max_length: most symbols in a string; lengths are uniform in between.
        train_size, val_size, test_size: strings per split.
        balance: for ``"accept"``, draw half accepted and half rejected strings (rejection
            sampling); ``False`` keeps the automaton's natural rate.
        transitions: ``custom`` only: ``[S][V]`` table of next states.
        accept_states: ``custom`` only: the accepting states.
        start_state: ``custom`` only: the start state.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default: ``2 * batch_size``).
        seed: seed of the data and of the training shuffle order.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        task: Task = "parity",
        target: Target = "accept",
        min_length: int = 4,
        max_length: int = 16,
        train_size: int = 4096,
        val_size: int = 512,
        test_size: int = 512,
        balance: bool = True,
        transitions: list[list[int]] | None = None,
        accept_states: list[int] | None = None,
        start_state: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_choice("task", task, TASKS)
        check_choice("target", target, ("accept", "state", "next_token"))
        check_int("min_length", min_length, low=1)
        check_int("max_length", max_length, low=1)
        if min_length > max_length:
            raise InvalidArgumentError("min_length", f"min_length ({min_length}) must be <= max_length ({max_length}).")
        check_int("train_size", train_size, low=1)
        check_int("val_size", val_size, low=0)
        check_int("test_size", test_size, low=0)
        check_bool("balance", balance)
        check_int("start_state", start_state, low=0)
        check_loader_args(batch_size, eval_batch_size, seed, num_workers)
        if task == "custom":
            self.dfa = _custom_dfa(transitions, accept_states, start_state)
        else:
            self.dfa = _builtin_only(task, transitions, accept_states)
        self.save_hyperparameters()
        self.task, self.target = task, target
        self.min_length, self.max_length = min_length, max_length
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.balance = balance
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.test_set: _DictDataset | None = None

    @property
    def vocab_size(self) -> int:
        return SYMBOL_OFFSET + self.dfa.num_symbols

    @property
    def num_classes(self) -> int:
        """Labels of ``target``: 2 (accept), the automaton's states (state), the vocabulary (next_token)."""
        return {"accept": 2, "state": self.dfa.num_states, "next_token": self.vocab_size}[self.target]

    def split_tensors(self, split: Literal["train", "val", "test"]) -> dict[str, torch.Tensor]:
        """The tensors of one split, drawn afresh from its own seed (deterministic)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SPLITS[split]]))
        n = self.sizes[split]
        if self.target == "accept" and self.balance:
            symbols, lengths, states = _balanced(self.dfa, n, self.min_length, self.max_length, rng)
        else:
            symbols, lengths, states = sample_strings(self.dfa, n, self.min_length, self.max_length, rng)
        return encode(symbols, lengths, states, self.dfa, self.target)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # drawn already (fit, then test)
            return
        self.train_set = _DictDataset(self.split_tensors("train"))
        self.val_set = _DictDataset(self.split_tensors("val")) if self.sizes["val"] else None
        self.test_set = _DictDataset(self.split_tensors("test")) if self.sizes["test"] else None

    def val_dataloader(self) -> DataLoader:
        return [] if self.val_set is None else self._loader(self.val_set, False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return [] if self.test_set is None else self._loader(self.test_set, False, self.eval_batch_size)


def _builtin_only(task: str, transitions: object, accept_states: object) -> DFA:
    if transitions is not None or accept_states is not None:
        raise InvalidArgumentError(
            "transitions", f"transitions/accept_states are for task='custom' only; task={task!r} has its own automaton."
        )
    return builtin_dfa(task)


def _custom_dfa(transitions: list[list[int]] | None, accept_states: list[int] | None, start_state: int) -> DFA:
    """Validate a user's automaton: a rectangular int table whose entries are states."""
    if not transitions or not isinstance(transitions, (list, tuple)):
        raise InvalidArgumentError("transitions", "task='custom' needs transitions: a [num_states][num_symbols] table of next states.")
    rows = [list(r) if isinstance(r, (list, tuple)) else None for r in transitions]
    n_states = len(rows)
    if any(r is None or len(r) != len(rows[0]) or not r for r in rows):
        raise InvalidArgumentError("transitions", "transitions must be a rectangular list of non-empty lists (one row per state).")
    for s, row in enumerate(rows):
        for a, nxt in enumerate(row):
            check_int(f"transitions[{s}][{a}]", nxt, low=0, high=n_states - 1)
    if not accept_states:
        raise InvalidArgumentError("accept_states", "task='custom' needs accept_states: a non-empty list of accepting states.")
    for i, s in enumerate(accept_states):
        check_int(f"accept_states[{i}]", s, low=0, high=n_states - 1)
    check_int("start_state", start_state, low=0, high=n_states - 1)
    return DFA(np.array(rows), accept=list(accept_states), start=start_state)
