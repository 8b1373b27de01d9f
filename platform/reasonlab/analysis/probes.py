"""What a trained model's hidden states hold, layer by layer (torch only, no MLflow).

Inputs are each example's prompt and target as its method writes them (teacher-forced). The state of layer
l is the hidden state after l blocks (l = 0: the embeddings), read through models/blocks.py, so the model's
own forward runs unchanged.

- Logit lens: every layer's state through the model's final norm and output layer, at every position;
  the probability and rank (0: the top token) of a target token: the answer's first token, predicted at the
  position before it, and each task-declared target that is one vocabulary token (a composition's bridge
  entity).
- Linear probes: for each task-declared target (`Task.probe_targets`), a multinomial logistic regression
  per layer from the state at the target's position to its label, fit on 70% of a probe set and scored on
  the other 30%, beside the majority-label rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from reasonlab.models.blocks import block_inputs, decoder_blocks, final_norm

ANSWER = "answer"  # the logit lens's default target
TRAIN_SHARE = 0.7  # of each probe set, for fitting the linear probes


@dataclass
class ProbeInputs:
    """A probe set tokenized: ids [B, T] and mask, the tokens of its first row, the position predicting each
    answer's first token and that token, and each declared target's (positions, labels)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    tokens: list[str]
    answer_at: np.ndarray
    answer_ids: np.ndarray
    targets: dict[str, tuple[np.ndarray, list[str]]]


def probe_inputs(examples, tokenizer, method, targets: dict[str, tuple[list, list[str]]]) -> ProbeInputs:
    """`targets`: name → (per example, the index of the prompt word whose position is probed, or None for
    the prompt's last token; per example, the label)."""
    eos = tokenizer.eos_token
    prompts = [method.prompt_text(e, eos) for e in examples]
    texts = [p + method.target_text(e, eos) for p, e in zip(prompts, examples)]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    width = max(len(ids) for ids in encoded["input_ids"])
    ids = torch.full((len(texts), width), tokenizer.eos_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    answer_at, answer_ids = np.zeros(len(texts), dtype=np.int64), np.zeros(len(texts), dtype=np.int64)
    positions = {name: np.zeros(len(texts), dtype=np.int64) for name in targets}
    for b, (row, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
        ends = np.array([end for _, end in offsets])
        start = len(prompts[b]) + texts[b][len(prompts[b]):].rindex(examples[b].answer)  # the answer's first char
        first = int(np.searchsorted(ends, start, side="right"))  # the token holding that char
        answer_at[b], answer_ids[b] = first - 1, row[first]
        prompt_start = prompts[b].index(examples[b].prompt)
        words = _word_ends(examples[b].prompt)
        last_prompt_token = int(np.searchsorted(ends, len(prompts[b]), side="left"))
        for name, (word_index, _) in targets.items():
            w = word_index[b]
            positions[name][b] = last_prompt_token if w is None else int(
                np.searchsorted(ends, prompt_start + words[w], side="left"))
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    return ProbeInputs(ids, mask, tokens, answer_at, answer_ids,
                       {name: (positions[name], list(labels)) for name, (_, labels) in targets.items()})


def _word_ends(text: str) -> list[int]:
    """The end offset of each whitespace-separated word of `text`."""
    ends, at = [], 0
    for word in text.split():
        at = text.index(word, at) + len(word)
        ends.append(at)
    return ends


@torch.no_grad()  # not inference mode: linear probes train on these states
def layer_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The hidden state after each number of blocks, [L + 1, B, T, d] (float32, on the CPU)."""
    blocks = decoder_blocks(model)
    device = next(model.parameters()).device
    out = []
    for lo in range(0, len(input_ids), batch_size):
        seen: dict[int, torch.Tensor] = {}

        def keep(layer, hidden):
            seen[layer] = hidden.detach()

        def last(module, args, output):
            seen[len(blocks)] = (output[0] if isinstance(output, tuple) else output).detach()

        handle = blocks[-1].register_forward_hook(last)
        try:
            with block_inputs(model, keep):
                model(input_ids=input_ids[lo: lo + batch_size].to(device),
                      attention_mask=attention_mask[lo: lo + batch_size].to(device), use_cache=False)
        finally:
            handle.remove()
        out.append(torch.stack([seen[i].float().cpu() for i in range(len(blocks) + 1)]))
    return torch.cat(out, dim=1)


@torch.no_grad()
def lens_logits(model, states: torch.Tensor) -> torch.Tensor:
    """States [..., d] read out as the last layer's are: final norm, then the output layer."""
    device = next(model.parameters()).device
    norm, head = final_norm(model), model.get_output_embeddings()
    dtype = head.weight.dtype
    return head(norm(states.to(device, dtype))).float().cpu()


def logit_lens(model, states: torch.Tensor, inputs: ProbeInputs, token_ids: np.ndarray) -> dict[str, np.ndarray]:
    """For target token `token_ids[b]` of each row: its probability, rank and whether it is the top token,
    at every layer and position, averaged over the rows that have that position: arrays [L + 1, T]."""
    n_layers, n_rows, width, _ = states.shape
    prob, rank, top1 = (np.zeros((n_layers, width)) for _ in range(3))
    mask = inputs.attention_mask.numpy().astype(bool)
    rows = torch.arange(n_rows)
    for layer in range(n_layers):
        logp = torch.log_softmax(lens_logits(model, states[layer]), dim=-1)  # [B, T, V]
        target = logp[rows, :, torch.as_tensor(token_ids)]  # [B, T]
        above = (logp > target[..., None]).sum(-1)
        prob[layer] = _masked_mean(target.exp().numpy(), mask)
        rank[layer] = _masked_mean(above.numpy().astype(float), mask)
        top1[layer] = _masked_mean((above == 0).numpy().astype(float), mask)
    return {"probability": prob, "rank": rank, "top1": top1}


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    counts = mask.sum(0)
    return np.where(counts > 0, (values * mask).sum(0) / np.maximum(counts, 1), np.nan)


def linear_probe(features: torch.Tensor, labels: list[str], seed: int = 0, steps: int = 200) -> dict[str, float]:
    """Fit a multinomial logistic regression on TRAIN_SHARE of (features [N, d], labels), score the rest:
    accuracies and the majority label's rate among the scored rows."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(label) for label in labels])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = max(1, min(len(y) - 1, round(TRAIN_SHARE * len(y))))
    train, test = order[:cut], order[cut:]
    x = features.float()
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    torch.manual_seed(seed)
    with torch.enable_grad():
        head = torch.nn.Linear(x.shape[1], len(classes))
        optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=steps, history_size=20,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(x[train]), y[train]) + 1e-3 * head.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    with torch.no_grad():
        predicted = head(x).argmax(-1)
    majority = torch.bincount(y[train], minlength=len(classes)).argmax()
    return {"train_accuracy": float((predicted[train] == y[train]).float().mean()),
            "test_accuracy": float((predicted[test] == y[test]).float().mean()),
            "majority_rate": float((y[test] == majority).float().mean()), "classes": len(classes),
            "train_rows": len(train), "test_rows": len(test)}


def single_tokens(tokenizer, labels: list[str]) -> np.ndarray | None:
    """The token id of each label, or None when some label is not one token."""
    ids = tokenizer([f" {label}" for label in labels], add_special_tokens=False)["input_ids"]
    plain = tokenizer(labels, add_special_tokens=False)["input_ids"]
    for chosen in (plain, ids):  # the vocabulary's form of the label: with or without a leading space
        if all(len(i) == 1 for i in chosen) and all(
                tokenizer.decode(i).strip() == label for i, label in zip(chosen, labels)):
            return np.array([i[0] for i in chosen])
    return None


def run_probes(model, tokenizer, method, sets: dict, targets_of, kinds: tuple[str, ...]) -> dict[str, list[dict]]:
    """Every probe of `kinds` ("logit_lens", "linear") on every probe set: CSV rows per kind.

    `sets`: name → examples; `targets_of(examples)`: name → (word indices, labels) the task declares."""
    out: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for set_name, examples in sets.items():
        targets = targets_of(examples)
        inputs = probe_inputs(examples, tokenizer, method, targets)
        states = layer_states(model, inputs.input_ids, inputs.attention_mask)
        rows = torch.arange(states.shape[1])
        if "logit_lens" in kinds:
            lens_targets = {ANSWER: (inputs.answer_ids, inputs.answer_at)}
            for name, (positions, labels) in inputs.targets.items():
                token_ids = single_tokens(tokenizer, labels)
                if token_ids is not None:
                    lens_targets[name] = (token_ids, positions)
            for name, (token_ids, positions) in lens_targets.items():
                lens = logit_lens(model, states, inputs, token_ids)
                at = int(np.bincount(positions).argmax())  # the target's (usual) position
                for layer in range(states.shape[0]):
                    for pos in range(states.shape[2]):
                        out["logit_lens"].append({
                            "set": set_name, "target": name, "layer": layer, "position": pos,
                            "token": inputs.tokens[pos] if pos < len(inputs.tokens) else "",
                            "target_position": pos == at, "probability": lens["probability"][layer, pos],
                            "mean_rank": lens["rank"][layer, pos], "top1": lens["top1"][layer, pos]})
        if "linear" in kinds:
            for name, (positions, labels) in inputs.targets.items():
                for layer in range(states.shape[0]):
                    features = states[layer][rows, torch.as_tensor(positions)]
                    out["linear"].append({"set": set_name, "target": name, "layer": layer,
                                          **linear_probe(features, labels)})
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_logit_lens(rows: list[dict], path: str, title: str) -> None:
    """One heatmap per (target, set): the target token's mean probability by layer (rows) and position
    (columns), the target's position marked."""
    plt = _pyplot()
    targets = list(dict.fromkeys(r["target"] for r in rows))
    sets = list(dict.fromkeys(r["set"] for r in rows))
    fig, axes = plt.subplots(len(targets), len(sets), figsize=(4.2 * len(sets), 3.6 * len(targets) + 0.6),
                             squeeze=False, layout="constrained")
    for i, target in enumerate(targets):
        for j, set_name in enumerate(sets):
            ax = axes[i, j]
            cells = [r for r in rows if r["target"] == target and r["set"] == set_name]
            layers = 1 + max(r["layer"] for r in cells)
            width = 1 + max(r["position"] for r in cells)
            grid = np.full((layers, width), np.nan)
            for r in cells:
                grid[r["layer"], r["position"]] = r["probability"]
            image = ax.imshow(grid, origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis")
            tokens = {r["position"]: r["token"] for r in cells}
            ax.set_xticks(range(width), [tokens[p] for p in range(width)], rotation=90, fontsize=6)
            ax.set_yticks(range(layers))
            ax.set_ylabel("layer (blocks applied)")
            ax.set_title(f"P({target}) — {set_name}", fontsize=9)
            marked = {r["position"] for r in cells if r["target_position"]}
            for p in marked:
                ax.axvline(p, color="white", lw=0.8, ls=":")
    fig.colorbar(image, ax=axes, shrink=0.8, label="probability")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_linear(rows: list[dict], path: str, title: str) -> None:
    """One heatmap per set: held-out probe accuracy by layer (rows) and target (columns)."""
    plt = _pyplot()
    sets = list(dict.fromkeys(r["set"] for r in rows))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    layers = 1 + max(r["layer"] for r in rows)
    fig, axes = plt.subplots(1, len(sets), figsize=(max(3.5, 0.45 * len(targets) + 2.5) * len(sets), 4.2),
                             squeeze=False, layout="constrained")
    for ax, set_name in zip(axes[0], sets):
        grid = np.full((layers, len(targets)), np.nan)
        for r in rows:
            if r["set"] == set_name:
                grid[r["layer"], targets.index(r["target"])] = r["test_accuracy"]
        image = ax.imshow(grid, origin="lower", aspect="auto", vmin=0, vmax=1, cmap="magma")
        for (layer, t), value in np.ndenumerate(grid):
            if not math.isnan(value) and len(targets) * layers <= 120:
                ax.text(t, layer, f"{100 * value:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if value < 0.6 else "black")
        ax.set_xticks(range(len(targets)), targets, rotation=90, fontsize=7)
        ax.set_yticks(range(layers))
        ax.set_ylabel("layer (blocks applied)")
        ax.set_title(set_name, fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="held-out accuracy")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
