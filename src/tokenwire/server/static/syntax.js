// A small line-by-line syntax highlighter for code blocks in model output.
//
// It tokenizes one line at a time and carries a tiny state (inside a block comment or a
// multi-line string) to the next line, so a streaming code block highlights each finished
// line once. Output is DOM nodes: spans with a fixed class and text set as text, never HTML.

const words = (s) => new Set(s.split(/\s+/).filter(Boolean));

const C_LIKE = {
  lineComment: ["//"],
  block: ["/*", "*/"],
  strings: ['"', "'"],
  literals: words("true false null NULL nullptr"),
};

const LANGS = {
  python: {
    label: "Python",
    lineComment: ["#"],
    strings: ['"', "'"],
    triple: true,
    keywords: words(`and as assert async await break class continue def del elif else except
      finally for from global if import in is lambda match case nonlocal not or pass raise
      return try while with yield`),
    literals: words("True False None self cls"),
    builtins: words(`print len range str int float list dict set tuple open isinstance super
      enumerate zip map filter sorted sum min max abs type object Exception`),
  },
  javascript: {
    ...C_LIKE,
    label: "JavaScript",
    strings: ['"', "'", "`"],
    multiline: "`",
    keywords: words(`async await break case catch class const continue debugger default delete
      do else export extends finally for from function if import in instanceof let new of
      return static super switch this throw try typeof var void while with yield interface
      type enum implements private public protected readonly as`),
    literals: words("true false null undefined NaN Infinity"),
    builtins: words("console window document Math JSON Promise Object Array String Number"),
  },
  json: {
    label: "JSON",
    strings: ['"'],
    keys: true,
    literals: words("true false null"),
  },
  bash: {
    label: "Shell",
    lineComment: ["#"],
    strings: ['"', "'"],
    variables: true,
    keywords: words(`if then else elif fi for while until do done case esac in function return
      export local readonly set unset source exit`),
    builtins: words(`echo cd ls cat grep sed awk curl wget git pip python python3 npm make
      sudo apt apt-get mkdir rm cp mv chmod docker tokenwire`),
  },
  c: {
    ...C_LIKE,
    label: "C",
    preprocessor: true,
    keywords: words(`auto break case char const continue default do double else enum extern
      float for goto if inline int long register return short signed sizeof static struct
      switch typedef union unsigned void volatile while bool class namespace template
      typename public private protected virtual override new delete using std auto`),
  },
  java: {
    ...C_LIKE,
    label: "Java",
    keywords: words(`abstract boolean break byte case catch char class continue default do
      double else enum extends final finally float for if implements import instanceof int
      interface long new package private protected public return short static super switch
      this throw throws try void while var fun val when object override data`),
  },
  go: {
    ...C_LIKE,
    label: "Go",
    strings: ['"', "'", "`"],
    multiline: "`",
    keywords: words(`break case chan const continue default defer else fallthrough for func go
      goto if import interface map package range return select struct switch type var`),
    literals: words("true false nil iota"),
  },
  rust: {
    ...C_LIKE,
    label: "Rust",
    keywords: words(`as async await break const continue crate dyn else enum extern fn for if
      impl in let loop match mod move mut pub ref return self Self static struct super trait
      type unsafe use where while`),
    literals: words("true false None Some Ok Err"),
  },
  sql: {
    label: "SQL",
    lineComment: ["--"],
    block: ["/*", "*/"],
    strings: ["'", '"'],
    caseInsensitive: true,
    keywords: words(`select from where and or not insert into values update set delete create
      table index drop alter join left right inner outer on group by order having limit as
      distinct union all primary key foreign references null is in like between case when
      then else end`),
  },
  css: {
    label: "CSS",
    block: ["/*", "*/"],
    strings: ['"', "'"],
    keys: true,
  },
  html: { label: "HTML", markup: true },
  yaml: { label: "YAML", lineComment: ["#"], strings: ['"', "'"], yamlKeys: true },
  toml: { label: "TOML", lineComment: ["#"], strings: ['"', "'"], yamlKeys: true },
  diff: { label: "Diff", diff: true },
};

const ALIASES = {
  py: "python",
  python3: "python",
  js: "javascript",
  jsx: "javascript",
  mjs: "javascript",
  ts: "javascript",
  tsx: "javascript",
  typescript: "javascript",
  sh: "bash",
  shell: "bash",
  zsh: "bash",
  console: "bash",
  cpp: "c",
  "c++": "c",
  h: "c",
  hpp: "c",
  cc: "c",
  cs: "java",
  csharp: "java",
  kotlin: "java",
  kt: "java",
  rs: "rust",
  golang: "go",
  xml: "html",
  svg: "html",
  yml: "yaml",
  patch: "diff",
  jsonc: "json",
};

function langOf(name) {
  const key = (name || "").toLowerCase();
  return LANGS[ALIASES[key] || key] || null;
}

/** A human label for a fence's info string. */
export function languageLabel(name) {
  if (!name) return "text";
  const lang = langOf(name);
  return lang && !ALIASES[name.toLowerCase()] ? lang.label : name;
}

function span(cls, text) {
  const node = document.createElement("span");
  node.className = `tok-${cls}`;
  node.textContent = text;
  return node;
}

/**
 * Highlights one line. `state` is what the previous line left open (or null); returns the
 * nodes and the state for the next line.
 */
export function highlightLine(line, name, state) {
  const lang = langOf(name);
  if (!lang || !line) return { nodes: line ? [document.createTextNode(line)] : [], state };
  const out = [];
  let plain = "";
  const push = (cls, text) => {
    if (plain) out.push(document.createTextNode(plain));
    plain = "";
    out.push(span(cls, text));
  };
  if (lang.diff) {
    const cls = /^(\+\+\+|---)/.test(line)
      ? "meta"
      : line[0] === "+"
        ? "inserted"
        : line[0] === "-"
          ? "deleted"
          : line.startsWith("@@")
            ? "meta"
            : null;
    return { nodes: [cls ? span(cls, line) : document.createTextNode(line)], state: null };
  }
  let i = 0;
  // Continue what the previous line left open.
  if (state?.until) {
    const end = line.indexOf(state.until);
    if (end < 0) {
      push(state.cls, line);
      return { nodes: out, state };
    }
    push(state.cls, line.slice(0, end + state.until.length));
    i = end + state.until.length;
    state = null;
  }
  if (lang.markup) return highlightMarkup(line, i, out, push, () => plain, state);
  if (lang.preprocessor && /^\s*#/.test(line)) {
    push("meta", line);
    return { nodes: out, state: null };
  }
  while (i < line.length) {
    const rest = line.slice(i);
    const c = line[i];
    if (lang.lineComment?.some((p) => rest.startsWith(p))) {
      // In shell, `#` starts a comment only at a word boundary ($#, a#b are not).
      if (!(name && langOf(name) === LANGS.bash && i > 0 && !/\s/.test(line[i - 1]))) {
        push("comment", rest);
        i = line.length;
        break;
      }
    }
    if (lang.block && rest.startsWith(lang.block[0])) {
      const end = line.indexOf(lang.block[1], i + lang.block[0].length);
      if (end < 0) {
        push("comment", rest);
        return { nodes: out, state: { until: lang.block[1], cls: "comment" } };
      }
      push("comment", line.slice(i, end + lang.block[1].length));
      i = end + lang.block[1].length;
      continue;
    }
    if (lang.triple && (rest.startsWith('"""') || rest.startsWith("'''"))) {
      const q = rest.slice(0, 3);
      const end = line.indexOf(q, i + 3);
      if (end < 0) {
        push("string", rest);
        return { nodes: out, state: { until: q, cls: "string" } };
      }
      push("string", line.slice(i, end + 3));
      i = end + 3;
      continue;
    }
    if (lang.strings?.includes(c)) {
      let j = i + 1;
      while (j < line.length && line[j] !== c) j += line[j] === "\\" ? 2 : 1;
      if (j >= line.length && lang.multiline === c) {
        push("string", rest);
        return { nodes: out, state: { until: c, cls: "string" } };
      }
      const text = line.slice(i, Math.min(j + 1, line.length));
      const isKey = (lang.keys && /^\s*:/.test(line.slice(j + 1))) || false;
      push(isKey ? "key" : "string", text);
      i += text.length;
      continue;
    }
    if (lang.variables && c === "$") {
      const m = /^\$(\{[^}]*\}|[A-Za-z_][\w]*|[0-9#?@*$!-])/.exec(rest);
      if (m) {
        push("variable", m[0]);
        i += m[0].length;
        continue;
      }
    }
    if (lang.yamlKeys && (i === 0 || /^\s*$/.test(line.slice(0, i)))) {
      const m = /^(-\s+)?([\w.-]+|\[[^\]]*\])(\s*[:=])/.exec(rest);
      if (m) {
        if (m[1]) plain += m[1];
        push("key", m[2]);
        plain += m[3];
        i += m[0].length;
        continue;
      }
    }
    if (/[0-9]/.test(c) && !/[\w$]/.test(line[i - 1] || "")) {
      const m = /^(0x[0-9a-fA-F_]+|[0-9][0-9_]*(\.[0-9_]+)?([eE][+-]?[0-9]+)?)[a-zA-Z]*/.exec(
        rest
      );
      push("number", m[0]);
      i += m[0].length;
      continue;
    }
    if (/[A-Za-z_$@]/.test(c)) {
      const m = /^[@A-Za-z_$][\w$]*/.exec(rest);
      const word = m[0];
      const key = lang.caseInsensitive ? word.toLowerCase() : word;
      let cls = null;
      if (lang.keywords?.has(key)) cls = "keyword";
      else if (lang.literals?.has(word)) cls = "literal";
      else if (lang.builtins?.has(word)) cls = "builtin";
      else if (word[0] === "@") cls = "meta";
      else if (line[i + word.length] === "(") cls = "function";
      else if (lang.keys && /^\s*:/.test(line.slice(i + word.length)) && lang === LANGS.css) {
        cls = "key";
      }
      if (cls) push(cls, word);
      else plain += word;
      i += word.length;
      continue;
    }
    plain += c;
    i++;
  }
  if (plain) out.push(document.createTextNode(plain));
  return { nodes: out, state: null };
}

function highlightMarkup(line, start, out, push, getPlain, state) {
  let plain = getPlain();
  const flushPlain = () => {
    if (plain) out.push(document.createTextNode(plain));
    plain = "";
  };
  const pushTok = (cls, text) => {
    flushPlain();
    out.push(span(cls, text));
  };
  let i = start;
  while (i < line.length) {
    const rest = line.slice(i);
    if (rest.startsWith("<!--")) {
      const end = line.indexOf("-->", i + 4);
      if (end < 0) {
        pushTok("comment", rest);
        return { nodes: out, state: { until: "-->", cls: "comment" } };
      }
      pushTok("comment", line.slice(i, end + 3));
      i = end + 3;
      continue;
    }
    const tag = /^<\/?[A-Za-z][\w:-]*/.exec(rest);
    if (tag) {
      pushTok("keyword", tag[0]);
      i += tag[0].length;
      // Attributes up to the end of the tag.
      while (i < line.length && line[i] !== ">") {
        const attr = /^\s+[\w:-]+/.exec(line.slice(i));
        const str = /^=\s*("[^"]*"?|'[^']*'?)/.exec(line.slice(i));
        if (attr) {
          pushTok("key", attr[0]);
          i += attr[0].length;
        } else if (str) {
          pushTok("string", str[0]);
          i += str[0].length;
        } else {
          plain += line[i];
          i++;
        }
      }
      continue;
    }
    plain += line[i];
    i++;
  }
  flushPlain();
  return { nodes: out, state: null };
}
