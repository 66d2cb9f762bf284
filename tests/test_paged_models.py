"""The reference models decode through a paged KV cache exactly as through their contiguous caches.

* Bagel's understanding path (text prompt, a bidirectional ViT image block, greedy text decode) for two
  sequences batched in paged steps equals each sequence run alone on ``BagelKVCache``, token for token.
* Qwen3-Omni's thinker -> talker hand-off: the thinker decodes two requests that start one step apart
  (mixed prefill + decode in one paged step), streams its tokens into each request's
  ``TalkerConditionStream``, and the talker (a code-predictor decoder) decodes codes in paged steps that hold
  only the requests whose condition has arrived; both equal each request run alone on ``KVCache`` with the
  synchronous conditions, token for token.
* The vLLM-Omni-style layer takes paged metadata (``block_table`` + ``seq_lens``).

The tiny language-model wrappers below (embedding, the blocks with residuals, a head) exist only to decode;
the attention blocks are the models_ref ones. Decoding picks ``argmax(logits + noise)`` with fixed noise per
(request, step): deterministic like greedy decoding, but a random tiny model does not repeat one token.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnlib
from attnlib.kvcache import PagedKVCache
from models_ref import RMSNorm
from models_ref.bagel import BagelKVCache, BagelPositions, PackedAttentionMoT
from models_ref.parity import BAGEL_CONFIG, CODE_PREDICTOR_KWARGS, THINKER_KWARGS
from models_ref.qwen3_omni import (WAIT, CodePredictor, KVCache, TalkerConditionStream, ThinkerAttention,
                                   sync_talker_conditions)

BACKENDS = ["math", "sdpa"]
VOCAB = 37


#: fixed decoding noise per (request, step)
NOISE = torch.randn(2, 16, VOCAB, generator=torch.Generator().manual_seed(99))


CODE_NOISE = torch.randn(2, 16, CODE_PREDICTOR_KWARGS["vocab_size"], generator=torch.Generator().manual_seed(98))


def pick(logits, request: int, step: int, noise=NOISE) -> torch.Tensor:
    return (logits + noise[request, step]).argmax()


def _seeded(module: nn.Module, seed: int, std: float = 0.3) -> nn.Module:
    torch.manual_seed(seed)
    for p in module.parameters():
        nn.init.normal_(p, std=std)
    return module.eval()


# ---------------------------------------------------------------------------------------------------
# Bagel: understanding path
# ---------------------------------------------------------------------------------------------------
class BagelLM(nn.Module):
    """Token embedding, ``PackedAttentionMoT`` layers with residuals, norm, head (greedy decode only)."""

    def __init__(self, layers=2):
        super().__init__()
        hid = BAGEL_CONFIG["hidden_size"]
        self.embed = nn.Embedding(VOCAB, hid)
        self.layers = nn.ModuleList(PackedAttentionMoT(**BAGEL_CONFIG, layer_idx=i) for i in range(layers))
        self.norm = RMSNorm(hid)
        self.head = nn.Linear(hid, VOCAB, bias=False)

    def forward(self, x, seqlens, positions, caches, causal):
        """``x``: token ids ``[T]`` or embeddings ``[T, hid]``; ``caches``: one per layer (views) or a paged step."""
        h = self.embed(x) if x.dim() == 1 else x
        for i, layer in enumerate(self.layers):
            cache = caches if not isinstance(caches, list) else caches[i]
            h = h + layer(h, seqlens, positions, cache, causal=causal)
        return self.head(self.norm(h))


def _last(logits, seqlens):
    ends = torch.tensor(seqlens).cumsum(0) - 1
    return logits[ends]


def _bagel_scene():
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, VOCAB, (5,), generator=g), torch.randint(2, VOCAB, (7,), generator=g)]
    image = torch.randn(4, BAGEL_CONFIG["hidden_size"], generator=g)          # ViT tokens of sequence 0's image
    return prompts, image


def _bagel_alone(m, prompt, image, steps, request):
    """One sequence on ``BagelKVCache``: prompt, (image), greedy decode. Returns tokens and last logits."""
    caches = [BagelKVCache.empty(1) for _ in m.layers]
    pos = BagelPositions()
    logits = m(prompt, [len(prompt)], pos.text(len(prompt)), caches, causal=True)
    if image is not None:
        logits = m(image, [image.shape[0]], pos.image(image.shape[0]), caches, causal=False)
    tokens, all_logits = [], []
    tok = pick(logits[-1], request, 0)
    for i in range(steps):
        tokens.append(int(tok))
        logits = m(tok[None], [1], pos.text(1), caches, causal=True)
        all_logits.append(logits[-1])
        tok = pick(logits[-1], request, i + 1)
    return tokens, torch.stack(all_logits)


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_bagel_understanding_decodes_through_pages_token_for_token(backend):
    m = _seeded(BagelLM(), 11)
    prompts, image = _bagel_scene()
    steps = 8
    with attnlib.use_backend(backend):
        alone = [_bagel_alone(m, prompts[0], image, steps, 0), _bagel_alone(m, prompts[1], None, steps, 1)]
        cache = PagedKVCache(2, 16, 4, BAGEL_CONFIG["num_key_value_heads"], BAGEL_CONFIG["hidden_size"] //
                             BAGEL_CONFIG["num_attention_heads"])
        a, b = cache.new_sequence(), cache.new_sequence()
        pos = [BagelPositions(), BagelPositions()]
        step = cache.step({a: 5, b: 7})                                 # both prompts in one step
        logits = m(torch.cat(prompts), [5, 7], torch.cat([pos[0].text(5), pos[1].text(7)]), step, causal=True)
        nxt = [None, pick(_last(logits, [5, 7])[1], 1, 0)]
        step = cache.step({a: 4})                                       # sequence 0's image: bidirectional block
        nxt[0] = pick(m(image, [4], pos[0].image(4), step, causal=False)[-1], 0, 0)
        tokens, logits_seen = [[], []], [[], []]
        for s in range(steps):
            for i in range(2):
                tokens[i].append(int(nxt[i]))
            step = cache.step({a: 1, b: 1})
            logits = m(torch.stack(nxt), [1, 1], torch.cat([pos[0].text(1), pos[1].text(1)]), step, causal=True)
            for i in range(2):
                logits_seen[i].append(logits[i])
            nxt = [pick(logits[i], i, s + 1) for i in range(2)]
    for i in range(2):
        assert tokens[i] == alone[i][0]
        torch.testing.assert_close(torch.stack(logits_seen[i]), alone[i][1], atol=1e-5, rtol=1e-5)
    assert len(set(tokens[0] + tokens[1])) > 3                           # the decode is not degenerate


# ---------------------------------------------------------------------------------------------------
# Qwen3-Omni: thinker -> talker hand-off
# ---------------------------------------------------------------------------------------------------
IM_END = 1
STEPS = 6           # thinker tokens per request (before any <|im_end|>)
TALKER_STEPS = 5    # talker decode steps per request after its prefill


class ThinkerLM(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        hid = THINKER_KWARGS["hidden_size"]
        self.embed = nn.Embedding(VOCAB, hid)
        self.layers = nn.ModuleList(ThinkerAttention(**THINKER_KWARGS, layer_idx=i) for i in range(layers))
        self.norm = RMSNorm(hid)
        self.head = nn.Linear(hid, VOCAB, bias=False)

    def forward(self, ids, positions, cache):
        """``ids [B, S]``, text ``positions [B, S]``; ``cache``: a ``KVCache`` or a paged step."""
        h = self.embed(ids)
        rope = self.layers[0].rope_tables(positions)
        for layer in self.layers:
            h = h + layer(h, rope, None, cache)
        return self.head(self.norm(h))


class TalkerLM(nn.Module):
    """A code decoder on ``CodePredictor``: input = the text condition + the previous code's embedding."""

    def __init__(self):
        super().__init__()
        hid = CODE_PREDICTOR_KWARGS["hidden_size"]
        self.body = CodePredictor(**CODE_PREDICTOR_KWARGS)
        self.codes = nn.Embedding(CODE_PREDICTOR_KWARGS["vocab_size"], hid)
        self.text_proj = nn.Linear(THINKER_KWARGS["hidden_size"], hid)
        self.head = nn.Linear(hid, CODE_PREDICTOR_KWARGS["vocab_size"], bias=False)
        self.tts_eos = nn.Parameter(torch.zeros(hid))
        self.tts_pad = nn.Parameter(torch.zeros(hid))

    def forward(self, conditions, prev_codes, cache):
        """``conditions [B, S, hid]``, ``prev_codes [B, S]`` -> code logits ``[B, S, vocab]``."""
        return self.head(self.body(conditions + self.codes(prev_codes), cache))


def _thinker_alone(thinker, prompt, request):
    """One request on ``KVCache``: prompt, then greedy decode; tokens stop after <|im_end|>."""
    cache = KVCache()
    logits = thinker(prompt[None], torch.arange(len(prompt))[None], cache)
    out = []
    for i in range(STEPS):
        tok = pick(logits[0, -1], request, i)
        out.append(int(tok))
        if int(tok) == IM_END:
            break
        logits = thinker(tok[None, None], torch.tensor([[len(prompt) + i]]), cache)
    return out


def _talker_alone(talker, thinker, tokens, request):
    """The talker of one request on ``KVCache`` with the synchronous conditions."""
    embeds = talker.text_proj(thinker.embed(torch.tensor(tokens)))
    first, rest = sync_talker_conditions(tokens, embeds, TALKER_STEPS, im_end_id=IM_END, tts_eos=talker.tts_eos,
                                         tts_pad=talker.tts_pad)
    cache = KVCache()
    logits = talker(first[None, None], torch.zeros(1, 1, dtype=torch.long), cache)
    codes = []
    for cond in rest:
        code = pick(logits[0, -1], request, len(codes), CODE_NOISE)
        codes.append(int(code))
        logits = talker(cond[None, None], code[None, None], cache)
    return codes


def _heads(kw):
    return kw["num_key_value_heads"], kw.get("head_dim") or kw["hidden_size"] // kw["num_attention_heads"]


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_qwen3_omni_thinker_talker_hand_off_through_pages_token_for_token(backend):
    thinker, talker = _seeded(ThinkerLM(), 21), _seeded(TalkerLM(), 22)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g) for n in (5, 3)]
    with attnlib.use_backend(backend):
        want_text = [_thinker_alone(thinker, p, r) for r, p in enumerate(prompts)]
        want_codes = [_talker_alone(talker, thinker, t, r) for r, t in enumerate(want_text)]

        t_cache = PagedKVCache(2, 16, 4, *_heads(THINKER_KWARGS))
        k_cache = PagedKVCache(2, 16, 4, *_heads(CODE_PREDICTOR_KWARGS))
        streams = [TalkerConditionStream(im_end_id=IM_END, tts_eos=talker.tts_eos, tts_pad=talker.tts_pad)
                   for _ in prompts]
        t_seq = [t_cache.new_sequence() for _ in prompts]
        k_seq = [None, None]
        text, codes = [[], []], [[], []]
        pending = {}                 # request -> the thinker's next input token
        prev_code = [None, None]
        talker_logits = [None, None]
        waited = 0
        for tick in range(2 * STEPS + TALKER_STEPS):
            # -- thinker: request 1 joins one tick late (its prefill shares a step with request 0's decode);
            # request 0 is not scheduled every third tick, so its talker waits then
            items, ids = [], []
            for r in range(2):
                if tick == r:                                            # prefill
                    items.append((t_seq[r], len(prompts[r])))
                    ids.append(prompts[r])
                elif r in pending and not (r == 0 and tick % 3 == 2):    # decode
                    items.append((t_seq[r], 1))
                    ids.append(pending.pop(r)[None])
            if items:
                step = t_cache.step(items)
                logits = thinker(torch.cat(ids)[None], step.positions()[None], step)[0]
                for (seq, n), end in zip(items, torch.tensor(step.q_seqlens).cumsum(0) - 1):
                    r = t_seq.index(seq)
                    tok = pick(logits[end], r, len(text[r]))
                    text[r].append(int(tok))
                    streams[r].push([int(tok)], talker.text_proj(thinker.embed(tok[None])))
                    if int(tok) == IM_END or len(text[r]) == STEPS:
                        streams[r].finish()
                    else:
                        pending[r] = tok
            # -- talker: only the requests whose condition has arrived take part in this step
            items, conds, prevs = [], [], []
            for r in range(2):
                if k_seq[r] is None:
                    cond = streams[r].prefill()
                    if cond is WAIT:
                        continue
                    k_seq[r] = k_cache.new_sequence()
                    items.append((k_seq[r], 1))
                    conds.append(cond)
                    prevs.append(torch.tensor(0))
                elif len(codes[r]) < TALKER_STEPS:
                    cond = streams[r].next()
                    if cond is WAIT:
                        waited += 1
                        continue
                    code = pick(talker_logits[r], r, len(codes[r]), CODE_NOISE)
                    codes[r].append(int(code))
                    items.append((k_seq[r], 1))
                    conds.append(cond)
                    prevs.append(code)
            if items:
                step = k_cache.step(items)
                logits = talker(torch.stack(conds)[None], torch.stack(prevs)[None], step)[0]
                for (seq, _), row in zip(items, logits):
                    talker_logits[k_seq.index(seq)] = row
    assert text == want_text
    assert codes == want_codes
    assert len(set(text[0] + text[1])) > 3 and len(set(codes[0] + codes[1])) > 3      # not degenerate
    assert all(len(c) == TALKER_STEPS for c in codes) and waited > 0


# ---------------------------------------------------------------------------------------------------
# the vLLM-Omni-style layer
# ---------------------------------------------------------------------------------------------------
def test_vllm_omni_layer_takes_paged_metadata():
    from attnlib.integrations.vllm_omni import Attention, AttentionMetadata

    g = torch.Generator().manual_seed(12)
    cache = PagedKVCache(1, 16, 4, 2, 8)
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.step({a: 6, b: 2}).update(0, torch.randn(8, 2, 8, generator=g), torch.randn(8, 2, 8, generator=g))
    step = cache.step({a: 1, b: 3})                                      # decode + a prefill chunk
    q, k, v = torch.randn(4, 4, 8, generator=g), torch.randn(4, 2, 8, generator=g), torch.randn(4, 2, 8, generator=g)
    k_pool, v_pool = step.update(0, k, v)
    layer = Attention(4, 8, causal=True, softmax_scale=None, num_kv_heads=2)
    want = attnlib.attention(q, k_pool, v_pool, step.mask, block_table=step.block_table)
    cu = torch.tensor([0, 1, 4], dtype=torch.int32)
    for seq_lens in ([7, 5], torch.tensor([7, 5], dtype=torch.int32)):
        meta = AttentionMetadata(block_table=step.block_table, seq_lens=seq_lens, cu_seqlens_q=cu)
        torch.testing.assert_close(layer(q, k_pool, v_pool, meta), want)
        torch.testing.assert_close(layer(q[None], k_pool, v_pool, meta), want[None])
    # device lengths: seq_lens a device tensor with a host bound, no host read
    meta = AttentionMetadata(block_table=torch.cat([step.block_table, step.block_table], 1), cu_seqlens_q=cu,
                             seq_lens=torch.tensor([7, 5], dtype=torch.int32), max_seqlen_k=12)
    torch.testing.assert_close(layer(q, k_pool, v_pool, meta), want)
    with pytest.raises(ValueError, match="block_table"):
        layer(q, k_pool, v_pool, AttentionMetadata(block_table=step.block_table, cu_seqlens_q=cu))
