"""Caption degradation: rich captions -> prompt-enhancer training pairs.

The enhancer learns to add detail back to a terse prompt. Its pairs come from rich
captions stripped of specifics one category at a time (Qwen-Image-2.0's recipe); every
deletion is a pair (less detailed -> more detailed).

    from dataengine.degrade import DegradeConfig, detect, degrade_chain, pairs_table
    detect("A red car under soft morning light.")       # [Span(..., 'colour', 'red'), ...]
    degrade_chain(caption, DegradeConfig(seed=1), source_id="key-1")   # [Step, ...]
    pairs_table([(key, caption), ...], DegradeConfig())  # a PAIRS table

Modules: `taxonomy` (categories and word lists), `tokens` (tokens and the tag alphabet
the rules are written in), `detect` (span rules, the subject, overlap resolution),
`fluency` (removal with seam repair), `chains` (chains and the pairs table).

The subject is the head noun of the first sentence's main noun phrase, after any
leading frame ("A close-up shot of", "A watercolor painting of"), leading prepositional
phrase ("Under warm light,") or "there is"; no detector span may cover it and no step
removes it, so every prompt in a chain still names it.
"""

from .chains import DegradeConfig, Step, degrade_chain, normalise, pair_id, pairs_table
from .detect import Span, analyse, detect, find_subject
from .fluency import article_for
from .taxonomy import CATEGORIES, STRUCTURAL

__all__ = [
    "CATEGORIES", "STRUCTURAL", "DegradeConfig", "Span", "Step", "analyse", "article_for",
    "degrade_chain", "detect", "find_subject", "normalise", "pair_id", "pairs_table",
]
