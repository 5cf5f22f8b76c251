"""The metrics instruction models are judged by, on generated answers against references.

answer_metrics(predictions, references) -> {'exact_match', 'rougeL', 'bleu'}:
- exact_match: the share of answers equal to their reference once white space at both ends is removed (0-1);
- rougeL: the mean ROUGE-L F-measure of each answer against its reference, by Google's `rouge-score`
  (its default tokenizer: lower case, letters and digits; no stemming) (0-1);
- bleu: corpus BLEU of all answers, by `sacrebleu` (its default 13a tokenizer, one reference each), on
  sacrebleu's 0-100 scale, with sacrebleu's effective order: n-gram orders that no answer is long enough to
  have (4-grams in answers of three words) are left out of the geometric mean instead of making it 0, so
  short answers that match their references score 100, as they do on the other two metrics.
launch/eval.py --generate, the training loop's eval_generate and bench/ all score with this one function.
"""
import importlib.util

from trainer.errors import UserError

PACKAGES = {"rouge_score": "rouge-score==0.1.2", "sacrebleu": "sacrebleu==2.6.0"}  # as requirements.txt pins


def require_metric_packages(why="--generate"):
    """One line naming the pip command when rouge-score or sacrebleu is missing (their top packages import in
    70 ms; rouge-score's scorer, which imports nltk, only when answers are scored)."""
    missing = []
    for module, pip in PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(pip)
    if missing:
        raise UserError(f"{why} scores answers with rouge-score and sacrebleu, which are not installed; "
                        f"pip install {' '.join(missing)}")


def exact_match(prediction, reference):
    return prediction.strip() == reference.strip()


def answer_metrics(predictions, references):
    """{'exact_match' (0-1), 'rougeL' (0-1), 'bleu' (0-100)} of answers against their references."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    require_metric_packages("scoring answers")
    import sacrebleu
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return {"exact_match": sum(map(exact_match, predictions, references)) / len(predictions),
            "rougeL": sum(rouge) / len(rouge),
            "bleu": sacrebleu.BLEU(effective_order=True).corpus_score(list(predictions), [list(references)]).score}
