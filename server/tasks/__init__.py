"""Task modules, one per pipeline, each with its registration (registration.py). Serving a new head
means adding its module and registering it here."""

from __future__ import annotations

from onnxserve.server.tasks import (
    audio_classification,
    ctc_speech_recognition,
    feature_extraction,
    fill_mask,
    image_classification,
    image_feature_extraction,
    image_segmentation,
    image_to_text,
    masked_image_modeling,
    multiple_choice,
    object_detection,
    question_answering,
    speech_recognition,
    text_classification,
    token_classification,
    zero_shot_image_classification,
)
from onnxserve.server.tasks.generation import pipeline as generation
from onnxserve.server.tasks.registration import register

for _registration in (
    feature_extraction.REGISTRATION,
    text_classification.REGISTRATION,
    token_classification.REGISTRATION,
    question_answering.REGISTRATION,
    fill_mask.REGISTRATION,
    multiple_choice.REGISTRATION,
    generation.TEXT_GENERATION,
    generation.TEXT2TEXT_GENERATION,
    image_classification.REGISTRATION,
    zero_shot_image_classification.REGISTRATION,
    object_detection.REGISTRATION,
    image_segmentation.REGISTRATION,
    image_feature_extraction.REGISTRATION,
    masked_image_modeling.REGISTRATION,
    image_to_text.REGISTRATION,
    ctc_speech_recognition.REGISTRATION,
    audio_classification.REGISTRATION,
    speech_recognition.REGISTRATION,
):
    register(_registration)
