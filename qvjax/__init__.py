"""qvjax: one codebase to pretrain and compare attention paradigms (QKV, MQA, GQA, MLA, QV, QV-Ka)."""
