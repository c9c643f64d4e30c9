// A reply's reasoning, told apart from its answer (reasoning models write it between think tags).

const THINK_OPEN = "<think>";
const THINK_CLOSE = "</think>";

// A reply's reasoning and its answer. `<think>…</think>` anywhere in the text is reasoning; a
// lone `</think>` (templates that open the block in the prompt) ends the reasoning that came before.
export function splitReasoning(text) {
  const open = text.indexOf(THINK_OPEN);
  if (open >= 0) {
    const close = text.indexOf(THINK_CLOSE, open);
    if (close < 0) return { reasoning: text.slice(open + THINK_OPEN.length).trim(), answer: text.slice(0, open).trim(), thinking: true };
    return {
      reasoning: text.slice(open + THINK_OPEN.length, close).trim(),
      answer: (text.slice(0, open) + text.slice(close + THINK_CLOSE.length)).trim(),
      thinking: false,
    };
  }
  const close = text.indexOf(THINK_CLOSE);
  if (close >= 0) return { reasoning: text.slice(0, close).trim(), answer: text.slice(close + THINK_CLOSE.length).trim(), thinking: false };
  return { reasoning: "", answer: text, thinking: false };
}
