// Turning a model's text into safe DOM: Markdown made into HTML (marked),
// the HTML sanitized (DOMPurify) into a fragment, and only then math (KaTeX) and syntax
// highlighting (highlight.js) applied to that fragment's text. Nothing a model writes reaches the
// page without passing the sanitizer, and the two libraries that write markup after it only read
// text (KaTeX with `trust: false`, so \href and friends render as inert text).
/* global marked, DOMPurify, hljs, katex */

// --- Markdown with math ---------------------------------------------------------------------------

// Math becomes an empty placeholder carrying its TeX; KaTeX fills it in after sanitizing.
function mathPlaceholder(tex, display) {
  const escaped = tex.replace(/&/g, "&amp;").replace(/"/g, "&quot;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  return display ? `<div class="math math-display" data-tex="${escaped}"></div>` : `<span class="math" data-tex="${escaped}"></span>`;
}

const blockMath = {
  name: "blockMath",
  level: "block",
  start: (src) => src.match(/^ {0,3}(\$\$|\\\[)/m)?.index,
  tokenizer(src) {
    const match = /^ {0,3}(?:\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\])[ \t]*(?:\n+|$)/.exec(src);
    if (match) return { type: "blockMath", raw: match[0], tex: (match[1] ?? match[2]).trim() };
    return undefined;
  },
  renderer: (token) => mathPlaceholder(token.tex, true) + "\n",
};

const inlineMath = {
  name: "inlineMath",
  level: "inline",
  start: (src) => src.match(/\$|\\\(|\\\[/)?.index,
  tokenizer(src) {
    // $$…$$ and \[…\] display; \(…\) and $…$ inline. A single $ needs text right inside both
    // dollars and no digit after the closing one, so that prices ("$5 and $10") stay text.
    const match = /^\$\$([\s\S]+?)\$\$/.exec(src) || /^\\\[([\s\S]+?)\\\]/.exec(src);
    if (match) return { type: "inlineMath", raw: match[0], tex: match[1].trim(), display: true };
    const inline = /^\\\(([\s\S]+?)\\\)/.exec(src) || /^\$(?!\s)((?:\\.|[^\\$\n])+?)(?<!\s)\$(?!\d)/.exec(src);
    if (inline) return { type: "inlineMath", raw: inline[0], tex: inline[1].trim(), display: false };
    return undefined;
  },
  renderer: (token) => mathPlaceholder(token.tex, token.display),
};

const markdown = new marked.Marked({ gfm: true, breaks: true, async: false }); // a model's single line breaks are meant
markdown.use({ extensions: [blockMath, inlineMath] });

// --- sanitizing ---------------------------------------------------------------------------------

const SANITIZE = {
  // Beyond DOMPurify's defaults (no script, no event handlers, no javascript: URLs): nothing that
  // takes input, loads another document or styles the page; MathML and SVG are KaTeX's to write.
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option", "iframe", "frame", "frameset",
    "object", "embed", "link", "meta", "base", "svg", "math", "dialog", "template", "video", "audio", "source", "picture"],
  FORBID_ATTR: ["style", "srcset", "action", "formaction", "autofocus", "tabindex", "contenteditable", "popover"],
  ALLOW_DATA_ATTR: false,
  ADD_ATTR: ["data-tex"],
  RETURN_DOM_FRAGMENT: true,
};

// A model's markup keeps only the classes the page gives meaning to (a code block's language, math).
DOMPurify.addHook("uponSanitizeAttribute", (_node, data) => {
  if (data.attrName === "class") data.attrValue = data.attrValue.split(/\s+/).filter((c) => /^(language-[\w+#.-]+|math|math-display)$/.test(c)).join(" ");
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    const href = node.getAttribute("href") || "";
    if (/^\s*#/.test(href)) node.removeAttribute("href"); // no in-page jumps into the app's own elements
    else {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  }
  if (node.hasAttribute("id")) node.removeAttribute("id"); // ids from a model must not collide with the app's
  if (node.hasAttribute("name")) node.removeAttribute("name");
});

// The page makes no request for a model's images (they could go anywhere, or be a tracker):
// pictures inside the reply (data: URLs) show; any other image becomes a link to it.
function inertImages(fragment) {
  for (const img of fragment.querySelectorAll("img")) {
    const src = img.getAttribute("src") || "";
    if (/^data:image\/(png|gif|jpeg|webp);/i.test(src)) continue;
    const label = `[image${img.alt ? ": " + img.alt : ""}]`;
    if (/^https?:/i.test(src)) {
      const link = document.createElement("a");
      link.href = src;
      link.textContent = label;
      link.target = "_blank";
      link.rel = "noopener noreferrer nofollow";
      img.replaceWith(link);
    } else img.replaceWith(document.createTextNode(label));
  }
}

// --- after sanitizing: math, code, direction ---------------------------------------------------------

const KATEX_OPTIONS = { throwOnError: false, trust: false, strict: "ignore", maxSize: 50, maxExpand: 200, output: "htmlAndMathml" };

function renderMath(fragment) {
  for (const el of fragment.querySelectorAll(".math[data-tex]")) {
    const tex = el.getAttribute("data-tex");
    el.removeAttribute("data-tex");
    try {
      katex.render(tex, el, { ...KATEX_OPTIONS, displayMode: el.classList.contains("math-display") });
    } catch {
      el.textContent = tex;
    }
  }
}

const HIGHLIGHT_LIMIT = 100_000; // characters; longer code stays plain, to keep typing responsive

function dressCode(fragment, copyLabel) {
  for (const pre of fragment.querySelectorAll("pre")) {
    const code = pre.querySelector("code") || pre;
    const lang = (/\blanguage-([\w+#.-]+)/.exec(code.className) || [])[1] || "";
    const text = code.textContent;
    if (text.length <= HIGHLIGHT_LIMIT) {
      const known = lang && hljs.getLanguage(lang);
      const result = known ? hljs.highlight(text, { language: lang, ignoreIllegals: true }) : null;
      if (result) {
        code.innerHTML = result.value; // highlight.js escapes the text it is given
        code.classList.add("hljs");
      }
    }
    const block = document.createElement("div");
    block.className = "code-block";
    const head = document.createElement("div");
    head.className = "code-head";
    const label = document.createElement("span");
    label.textContent = lang || "text";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy-code";
    copy.textContent = copyLabel;
    copy.setAttribute("aria-label", `Copy ${lang || "text"} code`);
    head.append(label, copy);
    pre.replaceWith(block);
    pre.dir = "ltr";
    block.append(head, pre);
  }
}

// Each block follows the direction of its own text, so an Arabic paragraph in an English reply reads right to left.
function autoDirection(fragment) {
  for (const el of fragment.querySelectorAll("p, li, h1, h2, h3, h4, h5, h6, blockquote, td, th, summary")) el.dir = "auto";
}

// The DOM of a Markdown text, safe to insert.
export function renderMarkdown(text) {
  const fragment = DOMPurify.sanitize(markdown.parse(text), SANITIZE);
  inertImages(fragment);
  renderMath(fragment);
  dressCode(fragment, "Copy");
  autoDirection(fragment);
  return fragment;
}
