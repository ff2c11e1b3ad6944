"""Gradient strategy: Adam on the mixture logits z through the merged model's dev loss.

Row t of the trace holds w_t, the training loss at w_t and, on evaluation steps, the held-out loss
at w_t; the update to w_{t+1} comes after. Early stopping keeps the w with the best held-out loss
and stops after ``patience`` evaluations without a gain of at least ``min_delta``. Under
constraints (``feasible``) each Adam step is followed by the KL projection of the logits onto the
feasible set, so every w the model is evaluated at is feasible (why this projection:
:mod:`mergeopt.merging.constraints`). A hierarchical mixture (``groups``) steps on its two levels of
logits instead, z = [group logits, logits within the groups] (:mod:`mergeopt.merging.groups`); the
loop, its checkpoints and its early stopping are the same.

Under constraints the step drops the pushes of the experts held at a bound
(:meth:`FeasibleSet.held_gradient`): their entries of ∂L/∂w become the free experts' common value
before the gradient reaches the logits. Without that, Adam could stall: it scales each logit's step
to about the learning rate, so when every free expert's logit gradient has the same sign (the held
experts taking the other) all free logits move by the same amount, a common factor on their weights
that the KL projection undoes, and w never leaves its start (tests/test_constraints.py has such a
problem: 0.1 from scipy's optimum after 1,500 steps). Released, the free logits' gradients sum to
zero, so the free experts trade weight among themselves, and at the constrained optimum the gradient
is exactly 0. A hierarchical mixture under constraints steps on the flat logits from the hierarchy's
start (:func:`mergeopt.fit`): on two levels a held expert still moves its group's logit, and Adam
circles the optimum rather than settling on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mergeopt.config import OptimSection
from mergeopt.errors import Interrupted, UserError
from mergeopt.merging.constraints import FeasibleSet
from mergeopt.merging.groups import Groups
from mergeopt.merging.stack import TaskVectorStack
from mergeopt.merging.weights import weights_from_logits
from mergeopt.objectives.data import DevSet, has_heldout, training_batches
from mergeopt.objectives.loss import dev_loss, evaluate, target_loss
from mergeopt.runtime import faults
from mergeopt.runtime.distributed import all_reduce_sum, is_main
from mergeopt.runtime.interrupts import check_interrupt_together, stop_together
from mergeopt.runtime.resume import RunState


@dataclass
class GradientResult:
    weights: torch.Tensor  # the chosen w (best held-out, or last when nothing is held out)
    logits: torch.Tensor
    best_step: int
    steps_run: int
    stopped_early: bool
    best_heldout_loss: float | None
    trace: list[dict] = field(default_factory=list)
    # the fit stopped because a number went non-finite: {"step", "quantity", "value"} (None: it did not)
    non_finite: dict | None = None


def _non_finite(step: int, quantity: str, value: float) -> dict:
    """What stopped a diverging fit, as mixture.json records it (JSON has no NaN: the value is text)."""
    return {"step": step, "quantity": quantity, "value": str(value)}


def _tracking(to_weights: Callable, w_grad: torch.Tensor) -> Callable:
    """``to_weights`` that adds ∂L/∂w of each backward pass into ``w_grad`` (its gradient unchanged)."""

    def add(g: torch.Tensor) -> None:
        w_grad.add_(g.detach().double())

    def weights(z: torch.Tensor) -> torch.Tensor:
        w = to_weights(z)
        if w.requires_grad:
            w.register_hook(add)
        return w

    return weights


def _release_held(
    z: torch.Tensor, to_weights: Callable, feasible: FeasibleSet, w: torch.Tensor, w_grad: torch.Tensor
) -> None:
    """z.grad = Jᵀ ĝ instead of Jᵀ g, ĝ = FeasibleSet.held_gradient: an expert held at a bound no
    longer moves the others. Untouched (bit for bit) when no expert is held."""
    g = w_grad.cpu().numpy()
    pushes = g - feasible.held_gradient(w.cpu().numpy(), g)
    if not pushes.any():
        return
    with torch.enable_grad():
        (correction,) = torch.autograd.grad(to_weights(z), z, torch.from_numpy(pushes).to(z.device))
    z.grad.sub_(correction)


class _Fit:
    """Adam on the logits z, with early stopping on the held-out loss, checkpoints, resume and the
    stop on a non-finite number: the loop's state and the parts of its step. The losses come as
    functions (:func:`fit_gradient` says which), so nothing here knows about models or data."""

    def __init__(
        self,
        z: torch.Tensor,
        optim: OptimSection,
        to_weights: Callable[[torch.Tensor], torch.Tensor],
        w_grad: torch.Tensor,
        held_out: bool,
        checkpoint: RunState | None,
        feasible: FeasibleSet | None,
    ):
        self.z, self.optim, self.to_weights, self.w_grad, self.held_out = (
            z,
            optim,
            to_weights,
            w_grad,
            held_out,
        )
        self.checkpoint, self.feasible = checkpoint, feasible
        self.optimizer = torch.optim.Adam([z], lr=optim.lr)
        self.best_loss, self.best_z, self.best_step = math.inf, z.detach().clone(), 0
        self.stale_evals, self.stopped_early, self.trace, self.start = 0, False, [], 0
        self.finished = False  # the search ended (resumed from a saved end: nothing to run)
        # a non-finite loss, gradient or held-out loss stops the fit (Adam would only spread the NaN
        # into z, and every later w would be NaN): the result is the best w whose losses were finite
        self.non_finite, self.finite_z, self.finite_step = None, None, None

    def resume(self, batches: Iterator) -> None:
        """The exact state after step saved["next_step"] - 1, when a state was saved."""
        saved = self.checkpoint.load_gradient() if self.checkpoint is not None else None
        if saved is None:
            return
        with torch.no_grad():
            self.z.copy_(saved["z"].to(self.z.device))
        self.optimizer.load_state_dict(saved["optimizer"])
        self.best_loss, self.best_z = saved["best_loss"], saved["best_z"].to(self.z.device)
        self.best_step, self.stale_evals = saved["best_step"], saved["stale_evals"]
        self.trace, self.start = saved["trace"], saved["next_step"]
        if saved.get("finished"):  # the search ended (save_finished): no step is left to run
            self.stopped_early, self.finished = saved["stopped_early"], True
            return
        for _ in range(self.start * self.optim.grad_accum):  # the batch stream is seeded: skip what was used
            next(batches)

    def save(self, next_step: int, finished: bool = False) -> None:
        if self.checkpoint is not None and is_main():
            state = {"z": self.z.detach().cpu(), "optimizer": self.optimizer.state_dict()}
            state.update(best_loss=self.best_loss, best_z=self.best_z.cpu(), best_step=self.best_step)
            state.update(stale_evals=self.stale_evals, trace=self.trace, next_step=next_step)
            if finished:
                state.update(finished=True, stopped_early=self.stopped_early)
            self.checkpoint.save_gradient(state)

    def save_finished(self) -> None:
        """The search's end, saved: the closing evaluations and the report come after it (minutes
        on a large model, where a preemption lands too), and a stop there lost every step since
        the last ``optim.checkpoint_every`` (all of them with checkpoint_every above the steps run).
        Not after a non-finite loss: that fit is rerun to its stop from the last checkpoint."""
        if not self.finished and self.non_finite is None:
            self.save(self.trace[-1]["step"] + 1, finished=True)
            self.finished = True

    def heldout(self, t: int, w: torch.Tensor, heldout_loss: Callable[[torch.Tensor], float]) -> float:
        """The held-out loss at w_t, and early stopping's verdict on it."""
        try:
            heldout = heldout_loss(w)
        except Interrupted:  # Ctrl-C inside the evaluation: the state before it is step t's
            if t > self.start:  # step `start` is already saved (or is the start: nothing to resume)
                self.save(t)
            raise
        if not math.isfinite(heldout):
            self.non_finite = _non_finite(t, "held-out loss", heldout)
        elif heldout < self.best_loss - self.optim.min_delta:
            self.best_loss, self.best_z, self.best_step, self.stale_evals = (
                heldout,
                self.z.detach().clone(),
                t,
                0,
            )
        else:
            self.stale_evals += 1
            if self.stale_evals >= self.optim.patience:
                self.stopped_early = True
        return heldout

    def backward(self, w: torch.Tensor, next_loss: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """z.grad of the training loss at w_t over ``grad_accum`` micro-batches (``next_loss(z)``:
        the next one's loss; summed over the ranks under torchrun), and that loss."""
        self.optimizer.zero_grad(set_to_none=True)
        self.w_grad.zero_()
        step_loss = 0.0
        for _ in range(self.optim.grad_accum):
            loss = next_loss(self.z) / self.optim.grad_accum
            loss.backward()
            step_loss += float(all_reduce_sum(loss.detach().clone()))
        all_reduce_sum(self.z.grad)  # torchrun: the ranks' shares of the gradient add up to the batch's
        if self.feasible is not None:  # held experts push nothing (module docstring)
            _release_held(self.z, self.to_weights, self.feasible, w, all_reduce_sum(self.w_grad))
        return step_loss

    def finite(self, t: int, step_loss: float) -> bool:
        """Whether step t's loss and gradient are finite (w_t is then the last finite w); if not,
        what stopped the fit."""
        if not math.isfinite(step_loss) or not torch.isfinite(self.z.grad).all():
            bad = ("training loss", step_loss) if not math.isfinite(step_loss) else ("gradient", math.nan)
            self.non_finite = _non_finite(t, *bad)
            return False
        self.finite_z, self.finite_step = self.z.detach().clone(), t
        return True

    def update(self, t: int) -> None:
        """Adam's step to z_{t+1}, then back onto the feasible set's logits."""
        self.optimizer.step()
        if not torch.isfinite(self.z).all():  # an infinite step (optim.lr huge): w_{t+1} is undefined
            self.non_finite = _non_finite(t + 1, "mixture logits", math.nan)
            with torch.no_grad():
                self.z.copy_(self.finite_z)
        if self.feasible is not None:  # back onto the feasible set's logits (logsumexp(z) = 0)
            projected = self.feasible.project_logits(self.z.detach().cpu().numpy())
            with torch.no_grad():
                self.z.copy_(torch.from_numpy(projected).to(self.z.device))

    def result(self) -> GradientResult:
        """The best held-out w; without held-out data the last w, or the last finite one after a
        non-finite step."""
        best_z, best_step, best_loss = self.best_z, self.best_step, self.best_loss
        if self.non_finite is not None and (not self.held_out or best_loss == math.inf):
            if self.finite_z is None:  # not one w with finite losses: there is nothing to keep
                raise UserError(
                    f"the {self.non_finite['quantity']} is {self.non_finite['value']} at step "
                    f"{self.non_finite['step']}, before any finite step: the merged model gives no finite "
                    "loss at the starting mixture (check the experts, merge.scale and model.compute_dtype)"
                )
            best_z, best_step = self.finite_z, self.finite_step  # the last w whose training loss was finite
            best_loss = None
        elif not self.held_out:
            best_z, best_step, best_loss = self.z.detach().clone(), self.trace[-1]["step"], None
        return GradientResult(
            weights=self.to_weights(best_z).cpu(),
            logits=best_z.cpu(),
            best_step=best_step,
            steps_run=self.trace[-1]["step"],
            stopped_early=self.stopped_early,
            best_heldout_loss=best_loss,
            trace=self.trace,
            non_finite=self.non_finite,
        )


def _postfix(names: Sequence[str], w: torch.Tensor, step_loss: float, best_heldout: float | None) -> dict:
    """The progress bar's numbers after a step."""
    postfix = {"loss": f"{step_loss:.4f}"}
    if best_heldout is not None and best_heldout < math.inf:
        postfix["best_heldout"] = f"{best_heldout:.4f}"
    return postfix | {name: f"{v:.3f}" for name, v in zip(names, w.tolist())}


def fit_gradient(
    model: torch.nn.Module,
    stack: TaskVectorStack,
    sets: Sequence[DevSet],
    set_weights: torch.Tensor,
    optim: OptimSection,
    init_logits: torch.Tensor,
    seed: int,
    pad_id: int,
    device: torch.device,
    progress: bool = True,
    checkpoint: RunState | None = None,
    loss_chunk: int | None = None,
    on_step: Callable[[dict], None] | None = None,
    feasible: FeasibleSet | None = None,
    groups: Groups | None = None,
) -> GradientResult:
    """Adam on z from ``init_logits``; with ``checkpoint`` the state is saved every
    ``optim.checkpoint_every`` steps and on SIGINT/SIGTERM, and a saved state is resumed from.
    ``on_step`` sees each trace row as it is made (experiment trackers), from the resumed step on.
    With ``groups`` z holds both levels of the hierarchy (``groups.size`` logits); groups with
    ``feasible`` are searched on the flat logits (module docstring)."""
    assert feasible is None or groups is None, "fit searches groups under constraints on flat logits"
    names = stack.expert_names
    to_weights = weights_from_logits if groups is None else groups.weights
    w_grad = torch.zeros(len(names), dtype=torch.float64, device=device)  # ∂L/∂w of a step (constraints)
    step_weights = to_weights if feasible is None else _tracking(to_weights, w_grad)
    targeted = [i for i, a in enumerate(set_weights.tolist()) if a > 0]
    held_out = has_heldout(sets, set_weights.tolist())
    batches = training_batches(sets, targeted, optim.batch_size, pad_id, seed)

    def next_loss(z: torch.Tensor) -> torch.Tensor:
        return dev_loss(model, stack, z, next(batches).to(device), set_weights, loss_chunk, step_weights)

    def heldout_loss(w: torch.Tensor) -> float:
        per_set = evaluate(
            model, stack, w, sets, "heldout", optim.eval_batch_size, pad_id, device, loss_chunk
        )
        return float(target_loss(per_set, torch.ones_like(per_set), set_weights.cpu()))

    z = init_logits.detach().to(device=device, dtype=torch.float64).clone().requires_grad_(True)
    fit = _Fit(z, optim, to_weights, w_grad, held_out, checkpoint, feasible)
    fit.resume(batches)

    def record(row: dict) -> None:
        fit.trace.append(row)
        if on_step is not None:
            on_step(row)

    show = progress and is_main()
    bar = tqdm(
        total=optim.steps,
        initial=min(fit.start, optim.steps),
        desc="fitting mixture",
        unit="step",
        disable=not show,
    )
    for t in range(fit.start, optim.steps + 1 if not fit.finished else fit.start):
        w = to_weights(z.detach())
        row: dict = {"step": t, "loss": math.nan, "heldout_loss": math.nan}
        row.update({f"w_{n}": v for n, v in zip(names, w.tolist())})
        if held_out and (t % optim.eval_every == 0 or t == optim.steps):
            row["heldout_loss"] = fit.heldout(t, w, heldout_loss)
        if t == optim.steps or fit.stopped_early or fit.non_finite is not None:
            record(row)
            break
        row["loss"] = step_loss = fit.backward(w, next_loss)
        if not fit.finite(t, step_loss):
            record(row)
            break
        fit.update(t)
        record(row)
        if fit.non_finite is not None:
            break
        faults.reached("step", t + 1)  # tests only: MERGEOPT_FAULT=sigkill@step:N
        stop = check_interrupt_together()  # every rank stops at this same step
        if (t + 1) % optim.checkpoint_every == 0 or stop:
            fit.save(t + 1)
        if stop:
            stop_together(f"step {t + 1}")
        bar.update(1)
        bar.set_postfix(_postfix(names, w, step_loss, fit.best_loss if held_out else None), refresh=False)
    bar.close()
    fit.save_finished()
    return fit.result()
