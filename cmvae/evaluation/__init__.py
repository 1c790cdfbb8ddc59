"""Evaluation of trained models: clustering, coherence (with digit classifiers), FID and latent probes."""

from cmvae_engine.cmvae.evaluation.classifier import (
    ClassifierSet,
    DigitClassifier,
    find_classifiers,
    load_classifier,
    load_classifier_folder,
    train_classifier_set,
)
from cmvae_engine.cmvae.evaluation.clustering import clustering_evaluation
from cmvae_engine.cmvae.evaluation.coherence import conditional_coherence, unconditional_coherence
from cmvae_engine.cmvae.evaluation.latent_probe import latent_classification

__all__ = [
    "ClassifierSet",
    "DigitClassifier",
    "clustering_evaluation",
    "conditional_coherence",
    "find_classifiers",
    "latent_classification",
    "load_classifier",
    "load_classifier_folder",
    "train_classifier_set",
    "unconditional_coherence",
]
