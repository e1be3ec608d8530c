// Regex -> byte DFA, the automaton a compiled grammar keeps (see byte_dfa.py).
//
// The dialect is the one engine/grammar writes (a subset of Rust regex-syntax, which outlines-core
// compiles): literals and escaped punctuation, \x{HEX} and \xHH code points, classes of code points
// and ranges (a leading ^ negates), (?:...) and (...) groups, |, and the quantifiers * + ? {m} {m,}
// {m,n}. Anything else is refused (status kUnsupported) and the caller builds the DFA another way.
//
// parse -> AST -> Thompson NFA over bytes (each code-point set becomes its UTF-8 byte ranges; equal
// subexpressions before the same state share states) -> subset construction over the NFA's byte
// classes -> minimization (Hopcroft). Plain C ABI for ctypes: the compile workers
// do not import torch, so this cannot be a torch extension.
#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cctype>
#include <new>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr uint32_t kMaxCp = 0x10FFFF;
using Ranges = std::vector<std::pair<uint32_t, uint32_t>>;  // sorted, disjoint, inclusive code points

constexpr size_t kMaxMinimizeEdges = size_t(1) << 26;  // (state, byte class) pairs; minimizing keeps the live ones

enum Status : int { kOk = 0, kUnsupported = 1, kTooLarge = 2, kNoMemory = 3 };

struct Failure {
  Status status;
  std::string message;
};

// ---------------------------------------------------------------------------------------- AST
struct Node {
  enum Kind { kSet, kCat, kAlt, kRep } kind;
  Ranges set;                 // kSet
  std::vector<int> children;  // kCat, kAlt; kRep: one
  int lo = 0, hi = -1;        // kRep: hi -1 = unbounded
};

Ranges normalized(Ranges r) {
  std::sort(r.begin(), r.end());
  Ranges out;
  for (auto [a, b] : r) {
    // surrogates are not scalar values: no UTF-8 text holds them
    std::pair<uint32_t, uint32_t> pieces[2] = {{a, std::min(b, 0xD7FFu)}, {std::max(a, 0xE000u), b}};
    for (auto [x, y] : pieces) {
      if (x > y) continue;
      if (!out.empty() && x <= out.back().second + 1)
        out.back().second = std::max(out.back().second, y);
      else
        out.push_back({x, y});
    }
  }
  return out;
}

Ranges complemented(const Ranges& r) {
  Ranges out;
  uint32_t next = 0;
  for (auto [a, b] : normalized(r)) {
    if (a > next) out.push_back({next, a - 1});
    next = b + 1;
  }
  if (next <= kMaxCp) out.push_back({next, kMaxCp});
  return normalized(out);
}

class Parser {
 public:
  Parser(const char* text, size_t n) : p_(text), begin_(text), end_(text + n) {}

  std::vector<Node> nodes;

  int parse() {
    match_groups();
    int root = alternation();
    if (p_ != end_) fail("unbalanced ')'");
    return root;
  }

 private:
  const char* p_;
  const char* begin_;
  const char* end_;
  // where the group opened at each '(' closes (-1 elsewhere), and the node of each group's text parsed
  // so far: a group met again (the JSON string pattern, a free value's) is looked up, not parsed again
  std::vector<int32_t> close_;
  std::unordered_map<std::string_view, int> groups_;

  // `close_` by one pass that skips escapes and classes as the parser reads them; an unbalanced regex
  // leaves it partly unset and the parser reports it
  void match_groups() {
    close_.assign(size_t(end_ - begin_), -1);
    std::vector<int32_t> open;
    for (const char* q = begin_; q < end_; ++q) {
      if (*q == '\\') {
        ++q;
      } else if (*q == '[') {
        ++q;
        if (q < end_ && *q == '^') ++q;
        for (bool first = true; q < end_ && (*q != ']' || first); ++q, first = false)
          if (*q == '\\') ++q;
      } else if (*q == '(') {
        open.push_back(int32_t(q - begin_));
      } else if (*q == ')' && !open.empty()) {
        close_[size_t(open.back())] = int32_t(q - begin_);
        open.pop_back();
      }
    }
  }

  [[noreturn]] void fail(const std::string& why) { throw Failure{kUnsupported, why}; }
  bool more() const { return p_ < end_; }
  char peek() const { return *p_; }

  // Nodes are interned: an equal node (kind, bounds, set, and children, themselves interned) is the one
  // made before. A schema's regex repeats itself (the JSON string pattern is two thirds of a typical
  // one), so equal subexpressions are one node, and the NFA builder shares their states by node id.
  std::unordered_map<std::string, int> interned_;
  std::string key_;

  int add(Node n) {
    key_.assign(1, char(n.kind));
    auto put = [this](uint32_t v) { key_.append(reinterpret_cast<const char*>(&v), sizeof v); };
    put(uint32_t(n.lo)), put(uint32_t(n.hi));
    for (auto [a, b] : n.set) put(a), put(b);
    for (int c : n.children) put(uint32_t(c));
    auto [it, fresh] = interned_.try_emplace(key_, int(nodes.size()));
    if (fresh) nodes.push_back(std::move(n));
    return it->second;
  }

  int alternation() {
    std::vector<int> branches{concatenation()};
    while (more() && peek() == '|') {
      ++p_;
      branches.push_back(concatenation());
    }
    if (branches.size() == 1) return branches[0];
    return add(Node{Node::kAlt, {}, branches});
  }

  int concatenation() {
    std::vector<int> items;
    while (more() && peek() != '|' && peek() != ')') items.push_back(repetition());
    if (items.size() == 1) return items[0];
    return add(Node{Node::kCat, {}, items});
  }

  int repetition() {
    int atom_id = atom();
    while (more()) {
      int lo, hi;
      char c = peek();
      if (c == '*') { lo = 0; hi = -1; ++p_; }
      else if (c == '+') { lo = 1; hi = -1; ++p_; }
      else if (c == '?') { lo = 0; hi = 1; ++p_; }
      else if (c == '{') { ++p_; counts(lo, hi); }
      else break;
      if (more() && peek() == '?') fail("lazy quantifier");
      Node rep{Node::kRep, {}, {atom_id}};
      rep.lo = lo;
      rep.hi = hi;
      atom_id = add(rep);
    }
    return atom_id;
  }

  int number() {
    if (!more() || !isdigit(uint8_t(peek()))) fail("bad counted repetition");
    long v = 0;
    while (more() && isdigit(uint8_t(peek()))) {
      v = v * 10 + (*p_++ - '0');
      if (v > 1000000) fail("counted repetition too large");
    }
    return int(v);
  }

  void counts(int& lo, int& hi) {
    lo = number();
    hi = lo;
    if (more() && peek() == ',') {
      ++p_;
      hi = (more() && peek() == '}') ? -1 : number();
    }
    if (!more() || *p_++ != '}') fail("bad counted repetition");
    if (hi != -1 && hi < lo) fail("bad counted repetition");
  }

  int atom() {
    char c = *p_;
    if (c == '(') {
      const int32_t close = close_[size_t(p_ - begin_)];
      std::string_view text(p_, close < 0 ? 0 : size_t(close - (p_ - begin_)) + 1);
      if (close >= 0) {
        auto hit = groups_.find(text);
        if (hit != groups_.end()) {
          p_ += text.size();
          return hit->second;
        }
      }
      ++p_;
      if (more() && peek() == '?') {
        if (end_ - p_ < 2 || p_[1] != ':') fail("group flags");
        p_ += 2;
      }
      int inner = alternation();
      if (!more() || *p_++ != ')') fail("unbalanced '('");
      if (close >= 0) groups_.emplace(text, inner);
      return inner;
    }
    if (c == '[') return add(Node{Node::kSet, char_class(), {}});
    if (c == '\\') {
      uint32_t cp = escape();
      return add(Node{Node::kSet, {{cp, cp}}, {}});
    }
    if (c == '.' || c == '^' || c == '$') fail(std::string("'") + c + "'");
    if (c == '*' || c == '+' || c == '?' || c == '{') fail("quantifier without an operand");
    uint32_t cp = utf8_char();
    return add(Node{Node::kSet, {{cp, cp}}, {}});
  }

  uint32_t utf8_char() {
    uint8_t b = uint8_t(*p_++);
    if (b < 0x80) return b;
    int extra = b >= 0xF0 ? 3 : b >= 0xE0 ? 2 : b >= 0xC0 ? 1 : -1;
    if (extra < 0 || end_ - p_ < extra) fail("invalid UTF-8");
    uint32_t cp = b & (0x3F >> extra);
    for (int i = 0; i < extra; ++i) cp = (cp << 6) | (uint8_t(*p_++) & 0x3F);
    return cp;
  }

  static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }

  // after a backslash: the code point it stands for
  uint32_t escape() {
    ++p_;
    if (!more()) fail("trailing backslash");
    char c = *p_++;
    switch (c) {
      case 'n': return '\n';
      case 't': return '\t';
      case 'r': return '\r';
      case 'f': return '\f';
      case 'v': return '\v';
      case 'x': {
        uint32_t v = 0;
        if (more() && peek() == '{') {
          ++p_;
          int digits = 0;
          while (more() && peek() != '}') {
            int d = hex_digit(*p_++);
            if (d < 0 || ++digits > 8) fail("bad \\x{...}");
            v = v * 16 + uint32_t(d);
          }
          if (!more() || digits == 0) fail("bad \\x{...}");
          ++p_;
        } else {
          for (int i = 0; i < 2; ++i) {
            int d = more() ? hex_digit(*p_++) : -1;
            if (d < 0) fail("bad \\xHH");
            v = v * 16 + uint32_t(d);
          }
        }
        if (v > kMaxCp || (v >= 0xD800 && v <= 0xDFFF)) fail("\\x outside Unicode scalar values");
        return v;
      }
      default:
        if (uint8_t(c) < 0x80 && !isalnum(uint8_t(c))) return uint8_t(c);  // escaped punctuation
        fail(std::string("escape \\") + c);
    }
  }

  uint32_t class_item() {
    if (!more()) fail("unterminated class");
    if (peek() == '\\') return escape();
    if (peek() == '[') fail("nested class");
    return utf8_char();
  }

  Ranges char_class() {
    ++p_;  // '['
    bool negate = more() && peek() == '^';
    if (negate) ++p_;
    Ranges items;
    bool first = true;
    while (true) {
      if (!more()) fail("unterminated class");
      if (peek() == ']' && !first) { ++p_; break; }
      if ((peek() == '&' || peek() == '~' || peek() == '-') && end_ - p_ >= 2 && p_[1] == peek() && !first)
        fail("class set operation");
      uint32_t a = class_item();
      uint32_t b = a;
      if (more() && peek() == '-' && end_ - p_ >= 2 && p_[1] != ']') {
        ++p_;
        b = class_item();
        if (b < a) fail("reversed class range");
      }
      items.push_back({a, b});
      first = false;
    }
    return negate ? complemented(items) : normalized(items);
  }
};


// ---------------------------------------------------------------------------------------- NFA
struct Edge {
  uint8_t lo, hi;
  int32_t to;
};

struct NState {
  std::vector<Edge> edges;   // byte-range transitions (a state has these, or eps, or is the match)
  std::vector<int32_t> eps;  // empty transitions
  bool match = false;
};

using ByteSeq = std::vector<std::pair<uint8_t, uint8_t>>;

int utf8_encode(uint32_t cp, uint8_t* out) {
  if (cp < 0x80) { out[0] = uint8_t(cp); return 1; }
  if (cp < 0x800) { out[0] = uint8_t(0xC0 | (cp >> 6)); out[1] = uint8_t(0x80 | (cp & 0x3F)); return 2; }
  if (cp < 0x10000) {
    out[0] = uint8_t(0xE0 | (cp >> 12)); out[1] = uint8_t(0x80 | ((cp >> 6) & 0x3F));
    out[2] = uint8_t(0x80 | (cp & 0x3F));
    return 3;
  }
  out[0] = uint8_t(0xF0 | (cp >> 18)); out[1] = uint8_t(0x80 | ((cp >> 12) & 0x3F));
  out[2] = uint8_t(0x80 | ((cp >> 6) & 0x3F)); out[3] = uint8_t(0x80 | (cp & 0x3F));
  return 4;
}

// The UTF-8 encodings of the code points a..b as sequences of byte ranges (each sequence a product of
// ranges), split where the encoding length or a continuation byte's span changes.
void utf8_sequences(uint32_t a, uint32_t b, std::vector<ByteSeq>& out) {
  std::vector<std::pair<uint32_t, uint32_t>> todo{{a, b}};
  while (!todo.empty()) {
    auto [s, e] = todo.back();
    todo.pop_back();
    bool split = false;
    for (uint32_t edge : {0x7Fu, 0x7FFu, 0xFFFFu}) {
      if (s <= edge && edge < e) {
        todo.push_back({edge + 1, e});
        todo.push_back({s, edge});
        split = true;
        break;
      }
    }
    if (split) continue;
    for (int i = 1; i < 4 && !split; ++i) {
      uint32_t m = (1u << (6 * i)) - 1;
      if ((s & ~m) != (e & ~m)) {
        if ((s & m) != 0) {
          todo.push_back({(s | m) + 1, e});
          todo.push_back({s, s | m});
          split = true;
        } else if ((e & m) != m) {
          todo.push_back({e & ~m, e});
          todo.push_back({s, (e & ~m) - 1});
          split = true;
        }
      }
    }
    if (split) continue;
    uint8_t bs[4], be[4];
    int n = utf8_encode(s, bs);
    utf8_encode(e, be);
    ByteSeq seq;
    for (int i = 0; i < n; ++i) seq.push_back({bs[i], be[i]});
    out.push_back(std::move(seq));
  }
}

// A time limit on one build (none when ``max_seconds`` <= 0), checked every so many states.
struct Deadline {
  explicit Deadline(double max_seconds) : max_seconds(max_seconds), t0(std::chrono::steady_clock::now()) {}
  void check(const char* what, size_t states) const {
    if (max_seconds > 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > max_seconds)
      throw Failure{kTooLarge, std::string("building its ") + what + " passed its time limit at " +
                                   std::to_string(states) + " states"};
  }
  double max_seconds;
  std::chrono::steady_clock::time_point t0;
};

class NfaBuilder {
 public:
  NfaBuilder(const std::vector<Node>& ast, size_t max_states, const Deadline& deadline)
      : ast_(ast), max_(max_states), deadline_(deadline) {}

  std::vector<NState> st;

  int32_t make() {
    if (st.size() >= max_) throw Failure{kTooLarge, "its regex passed " + std::to_string(max_) + " NFA states"};
    if (st.size() % 4096 == 4095) deadline_.check("NFA", st.size());
    st.emplace_back();
    return int32_t(st.size()) - 1;
  }

  // the start state of ``node`` followed by ``next`` (compiled back to front). Equal subexpressions (one
  // interned node) followed by the same state share their states: a schema's regex repeats itself (the
  // same properties after different alternatives), and a shared tail is one DFA state where it would be
  // one per branch.
  int32_t compile(int node, int32_t next) {
    uint64_t key = (uint64_t(uint32_t(node)) << 32) | uint32_t(next);
    auto hit = built_.find(key);
    if (hit != built_.end()) return hit->second;
    int32_t start = build(node, next);
    built_.emplace(key, start);
    return start;
  }

 private:
  const std::vector<Node>& ast_;
  size_t max_;
  const Deadline& deadline_;
  std::unordered_map<uint64_t, int32_t> built_;     // (node, next) -> start state

  int32_t build(int node, int32_t next) {
    const Node& n = ast_[node];
    switch (n.kind) {
      case Node::kSet: return code_points(n.set, next);
      case Node::kCat:
        for (auto it = n.children.rbegin(); it != n.children.rend(); ++it) next = compile(*it, next);
        return next;
      case Node::kAlt: {
        std::vector<int32_t> starts;
        for (int c : n.children) starts.push_back(compile(c, next));
        int32_t s = make();
        st[s].eps = std::move(starts);
        return s;
      }
      case Node::kRep: {
        int child = n.children[0];
        int32_t cur = next;
        if (n.hi < 0) {  // x{lo,} = x^lo x*
          int32_t loop = make();
          int32_t body = compile(child, loop);
          st[loop].eps = {body, next};
          cur = loop;
        } else {  // x{lo,hi} = x^lo (x (x ...)?)?
          for (int i = 0; i < n.hi - n.lo; ++i) {
            int32_t body = compile(child, cur);
            int32_t skip = make();
            st[skip].eps = {body, next};
            cur = skip;
          }
        }
        for (int i = 0; i < n.lo; ++i) cur = compile(child, cur);
        return cur;
      }
    }
    return next;
  }

  // the set's UTF-8 byte ranges: one state holding every first byte's range, each going on through
  // states shared by all the sequences that end the same way (the continuation bytes after E1-EC and
  // after EE-EF lead to one state, so the DFA has one state where it would have two)
  int32_t code_points(const Ranges& set, int32_t next) {
    std::vector<ByteSeq> seqs;
    for (auto [a, b] : set) utf8_sequences(a, b, seqs);
    std::vector<std::pair<uint64_t, int32_t>> suffixes;  // (lo, hi, target) -> the state with that one edge
    auto suffix = [&](uint8_t lo, uint8_t hi, int32_t to) {
      uint64_t key = (uint64_t(lo) << 40) | (uint64_t(hi) << 32) | uint32_t(to);
      for (auto& [k, id] : suffixes)
        if (k == key) return id;
      int32_t id = make();
      st[id].edges.push_back({lo, hi, to});
      suffixes.push_back({key, id});
      return id;
    };
    int32_t root = make();
    for (const ByteSeq& seq : seqs) {
      int32_t to = next;
      for (size_t i = seq.size() - 1; i > 0; --i) to = suffix(seq[i].first, seq[i].second, to);
      st[root].edges.push_back({seq[0].first, seq[0].second, to});
    }
    return root;
  }
};

// ---------------------------------------------------------------------------------------- DFA
struct Dfa {
  int32_t n = 0;                // states 0..n-1 (0 initial); n is the dead state
  int nclasses = 0;
  uint8_t cls[256];             // byte -> class
  std::vector<int32_t> trans;   // [n, nclasses], -1 = dead
  std::vector<uint8_t> final;   // [n]
};

class Determinizer {
 public:
  Determinizer(const std::vector<NState>& nfa, size_t max_states, const Deadline& deadline)
      : nfa_(nfa), max_(max_states), deadline_(deadline), mark_(nfa.size(), 0) {}

  void run(int32_t start, Dfa& d) {
    byte_classes(d);
    std::vector<std::vector<int32_t>> buckets(d.nclasses);
    std::vector<int> touched;
    closure(&start, 1);
    intern();
    for (size_t i = 0; i < starts_.size() - 1; ++i) {
      if (i % 64 == 63) deadline_.check("automaton", i);
      touched.clear();
      bool is_final = false;
      for (int64_t k = starts_[i]; k < starts_[i + 1]; ++k) {
        const NState& ns = nfa_[pool_[k]];
        is_final |= ns.match;
        for (const Edge& e : ns.edges) {
          for (int c = d.cls[e.lo]; c <= d.cls[e.hi]; ++c) {
            if (buckets[c].empty()) touched.push_back(c);
            buckets[c].push_back(e.to);
          }
        }
      }
      d.final.push_back(is_final);
      std::sort(touched.begin(), touched.end());
      d.trans.resize((starts_.size() - 1) * d.nclasses, -1);
      for (int c : touched) {
        closure(buckets[c].data(), buckets[c].size());
        d.trans[i * d.nclasses + c] = intern();  // a new state's row is sized when its turn comes
        buckets[c].clear();
      }
    }
    d.n = int32_t(starts_.size() - 1);
  }

 private:
  const std::vector<NState>& nfa_;
  size_t max_;
  const Deadline& deadline_;
  std::vector<uint32_t> mark_;
  uint32_t gen_ = 0;
  std::vector<int32_t> pool_;           // the DFA states' NFA sets, one after another
  std::vector<int64_t> starts_{0};      // state i's set: pool_[starts_[i], starts_[i + 1])
  std::vector<uint64_t> hashes_;        // of each state's set
  std::vector<int32_t> slots_ = std::vector<int32_t>(1024, -1);  // open addressing: state ids
  std::vector<int32_t> set_, stack_;    // the set being built; the closure's work list

  void byte_classes(Dfa& d) {
    bool boundary[257] = {};
    for (const NState& s : nfa_)
      for (const Edge& e : s.edges) boundary[e.lo] = boundary[e.hi + 1] = true;
    int c = -1;
    for (int b = 0; b < 256; ++b) {
      if (b == 0 || boundary[b]) ++c;
      d.cls[b] = uint8_t(c);
    }
    d.nclasses = c + 1;
  }

  // set_ = the NFA states (with byte edges, or the match) reached from ``seeds`` by empty transitions, sorted
  void closure(const int32_t* seeds, size_t n) {
    if (++gen_ == 0) {
      std::fill(mark_.begin(), mark_.end(), 0);
      gen_ = 1;
    }
    set_.clear();
    stack_.assign(seeds, seeds + n);
    while (!stack_.empty()) {
      int32_t s = stack_.back();
      stack_.pop_back();
      if (mark_[s] == gen_) continue;
      mark_[s] = gen_;
      const NState& ns = nfa_[s];
      if (!ns.edges.empty() || ns.match) set_.push_back(s);
      for (int32_t t : ns.eps)
        if (mark_[t] != gen_) stack_.push_back(t);
    }
    std::sort(set_.begin(), set_.end());
  }

  static uint64_t hash(const int32_t* v, size_t n) {
    uint64_t h = 1469598103934665603ull ^ n;
    for (size_t i = 0; i < n; ++i) h = (h ^ uint32_t(v[i])) * 1099511628211ull;
    return h ^ (h >> 29);
  }

  // the id of the state whose set is set_ (a new state if none has it)
  int32_t intern() {
    uint64_t h = hash(set_.data(), set_.size());
    size_t mask = slots_.size() - 1;
    for (size_t at = h & mask;; at = (at + 1) & mask) {
      int32_t id = slots_[at];
      if (id < 0) break;
      int64_t len = starts_[id + 1] - starts_[id];
      if (hashes_[id] == h && len == int64_t(set_.size()) &&
          std::equal(set_.begin(), set_.end(), pool_.begin() + starts_[id]))
        return id;
    }
    int32_t id = int32_t(starts_.size() - 1);
    if (size_t(id) >= max_) throw Failure{kTooLarge, "its automaton passed " + std::to_string(max_) + " states"};
    pool_.insert(pool_.end(), set_.begin(), set_.end());
    starts_.push_back(int64_t(pool_.size()));
    hashes_.push_back(h);
    if (2 * hashes_.size() > slots_.size()) rehash();
    else place(id);
    return id;
  }

  void place(int32_t id) {
    size_t mask = slots_.size() - 1;
    size_t at = hashes_[id] & mask;
    while (slots_[at] >= 0) at = (at + 1) & mask;
    slots_[at] = id;
  }

  void rehash() {
    slots_.assign(slots_.size() * 2, -1);
    for (int32_t id = 0; id < int32_t(hashes_.size()); ++id) place(id);
  }
};

// ---------------------------------------------------------------------------------------- minimization
// Hopcroft's partition refinement: states that no continuation tells apart become one. Subset
// construction leaves many such states (the same property or string after different alternatives);
// each costs a table row and, when generation reaches it, a walk of the vocabulary.
//
// ``trans(s, c)`` for states 0..n-1 and byte classes 0..k-1, with state n-1 the dead state. Fills
// ``block_of`` (each state's block, numbered in the order of their first states, the dead state's block
// last) and returns the number of blocks.
template <class Trans>
int32_t minimize(int32_t n, int k, const uint8_t* accept, Trans trans, std::vector<int32_t>& block_of) {
  // the transitions into each live state, (class, source) pairs in CSR by target. Those into the dead
  // state are left out (most of a DFA's transitions): with every initial block a splitter, refining by
  // the live states alone separates what it must (Valmari & Lehtinen, partial transition functions)
  const int32_t dead = n - 1;
  std::vector<int32_t> start(size_t(n) + 1, 0);
  for (int32_t s = 0; s < dead; ++s)
    for (int c = 0; c < k; ++c) {
      int32_t t = trans(s, c);
      if (t != dead) ++start[size_t(t) + 1];
    }
  for (size_t i = 1; i < start.size(); ++i) start[i] += start[i - 1];
  std::vector<uint8_t> via(start.back());
  std::vector<int32_t> from(start.back());
  {
    std::vector<int32_t> at(start.begin(), start.end() - 1);
    for (int32_t s = 0; s < dead; ++s)
      for (int c = 0; c < k; ++c) {
        int32_t t = trans(s, c);
        if (t == dead) continue;
        int32_t i = at[t]++;
        via[i] = uint8_t(c), from[i] = s;
      }
  }
  // the partition: each block a run of ``elems``; a block's marked states are [first, mid)
  std::vector<int32_t> elems(n), loc(n), blk(n), first, end, mid;
  std::vector<uint8_t> queued;
  std::vector<int32_t> work;
  int32_t nf = 0;
  for (int32_t s = 0; s < n; ++s)
    if (accept[s] && s != n - 1) elems[nf++] = s;
  for (int32_t s = 0, j = nf; s < n; ++s)
    if (!(accept[s] && s != n - 1)) elems[j++] = s;
  auto add_block = [&](int32_t a, int32_t b) {
    int32_t id = int32_t(first.size());
    first.push_back(a), end.push_back(b), mid.push_back(a), queued.push_back(1);
    work.push_back(id);
    for (int32_t i = a; i < b; ++i) blk[elems[i]] = id, loc[elems[i]] = i;
  };
  if (nf > 0) add_block(0, nf);
  add_block(nf, n);  // both are splitters (see above)
  std::vector<std::vector<int32_t>> preimage(k);  // of the splitter, by class
  std::vector<int> classes;
  std::vector<int32_t> touched;
  while (!work.empty()) {
    int32_t b = work.back();
    work.pop_back();
    queued[b] = 0;
    classes.clear();
    for (int32_t i = first[b]; i < end[b]; ++i) {
      int32_t t = elems[i];
      for (int32_t j = start[t]; j < start[t + 1]; ++j) {
        if (preimage[via[j]].empty()) classes.push_back(via[j]);
        preimage[via[j]].push_back(from[j]);
      }
    }
    for (int c : classes) {  // split every block by "goes into b by c"
      touched.clear();
      for (int32_t s : preimage[c]) {
        int32_t y = blk[s];
        if (loc[s] < mid[y]) continue;  // marked already
        if (mid[y] == first[y]) touched.push_back(y);
        int32_t p = mid[y]++, q = loc[s], other = elems[p];
        elems[p] = s, loc[s] = p, elems[q] = other, loc[other] = q;
      }
      preimage[c].clear();
      for (int32_t y : touched) {
        if (mid[y] == end[y]) {  // every state of y goes into b: no split
          mid[y] = first[y];
          continue;
        }
        int32_t z = int32_t(first.size());  // the marked states leave y
        first.push_back(first[y]), end.push_back(mid[y]), mid.push_back(first[y]), queued.push_back(0);
        first[y] = mid[y];
        for (int32_t i = first[z]; i < end[z]; ++i) blk[elems[i]] = z;
        int32_t add = queued[y] || end[z] - first[z] < end[y] - first[y] ? z : y;
        if (!queued[add]) queued[add] = 1, work.push_back(add);
      }
    }
  }
  int32_t nblocks = int32_t(first.size()), next = 0;
  std::vector<int32_t> renum(nblocks, -1);
  renum[blk[dead]] = nblocks - 1;
  block_of.resize(n);
  for (int32_t s = 0; s < n; ++s) {
    if (renum[blk[s]] < 0) renum[blk[s]] = next++;
    block_of[s] = renum[blk[s]];
  }
  return nblocks;
}

// ``d`` with its equivalent states merged (unchanged when its language is empty).
void minimize(Dfa& d) {
  const int32_t n = d.n + 1, k = d.nclasses;
  d.final.push_back(0);  // the dead state's
  std::vector<int32_t> block_of;
  int32_t m = minimize(n, k, d.final.data(), [&](int32_t s, int c) {
    int32_t t = s == d.n ? -1 : d.trans[size_t(s) * k + c];
    return t < 0 ? d.n : t;
  }, block_of);
  d.final.pop_back();
  if (m == n || block_of[0] == m - 1) return;
  std::vector<int32_t> trans(size_t(m - 1) * k);
  std::vector<uint8_t> final(m - 1);
  std::vector<uint8_t> done(m - 1, 0);
  for (int32_t s = 0; s < d.n; ++s) {
    int32_t b = block_of[s];
    if (b == m - 1 || done[b]) continue;
    done[b] = 1;
    final[b] = d.final[s];
    for (int c = 0; c < k; ++c) {
      int32_t t = d.trans[size_t(s) * k + c];
      trans[size_t(b) * k + c] = t < 0 || block_of[t] == m - 1 ? -1 : block_of[t];
    }
  }
  d.n = m - 1, d.trans.swap(trans), d.final.swap(final);
}

struct Result {
  int status = kOk;
  std::string message;
  Dfa dfa;
};

// A new Result that ``build(dfa)`` fills, its failure recorded in it (null only when memory runs out for it).
template <class F>
Result* build_result(const F& build) {
  Result* r = new (std::nothrow) Result();
  if (!r) return nullptr;
  try {
    build(r->dfa);
  } catch (const Failure& f) {
    r->status = f.status;
    r->message = f.message;
  } catch (const std::bad_alloc&) {
    r->status = kNoMemory;
    r->message = "out of memory";
  }
  return r;
}

// The tokens ``state`` allows, walked down the vocabulary's byte trie (its nodes in preorder: node i holds
// byte ``byte[i]`` at depth ``depth[i]`` (1 under the root), ends token ``token[i]`` or -1, its subtree
// ends before node ``skip[i]``, and ``below[i]`` [4] is the set of bytes its subtree holds under it)
// through the columns ``cols`` [rows, width] (T: uint16 or int32) read by the byte classes ``cls``. A
// prefix shared by many tokens is stepped once and a dead one cuts its subtree. A subtree is not walked
// where its bytes all loop on the state its root reached (a string's body: its tokens all end there) or
// all lead to one same state from each state along the way down to its deepest token ``deepest[i]`` (a
// length-limited string's counter: each token ends where that chain of states ends after the token's
// length). A subtree's tokens are ``ranked[rank[i + 1]:rank[skip[i]]]`` (the tokens in node order;
// ``rank[i]``: how many end before node i), of lengths ``ranked_len``. ``by_id`` [vocab_size] is scratch,
// all -1 on entry and on return.
template <class T>
int64_t walk_trie(const T* cols, int64_t width, const uint8_t* cls, int64_t dead, int64_t state, const uint8_t* byte,
                  const int32_t* depth, const int32_t* skip, const int32_t* token, const int32_t* rank,
                  const int32_t* ranked, const int32_t* ranked_len, const int32_t* deepest, const uint64_t* below,
                  int64_t nodes, int32_t max_depth, int64_t vocab_size, int32_t* by_id, int64_t* out_ids,
                  int64_t* out_states) {
  std::vector<int64_t> at(size_t(max_depth) + 1), chain(size_t(max_depth) + 1);
  at[0] = state;
  std::unordered_map<int64_t, std::array<uint64_t, 4>> loops;  // the bytes that stay in each state met
  // Whether every byte under node i (reached in state s) leads from each state along the way to one same
  // state (a length-limited string's counter: any plain character counts one more); then chain[d] is the
  // state after the root's path and d - depth[i] more of those bytes, up to the subtree's deepest token.
  std::vector<int64_t> classes;
  std::array<bool, 256> seen{};
  auto uniform_chain = [&](int64_t i, int64_t s) {
    classes.clear();
    seen.fill(false);
    const uint64_t* u = below + 4 * i;
    for (int w = 0; w < 4; ++w)
      for (uint64_t bits = u[w]; bits; bits &= bits - 1) {
        int c = cls[w * 64 + __builtin_ctzll(bits)];
        if (!seen[c]) seen[c] = true, classes.push_back(c);
      }
    chain[depth[i]] = s;
    for (int32_t d = depth[i]; d < deepest[i]; ++d) {
      int64_t x = chain[d];
      if (x == dead) {
        chain[d + 1] = dead;
        continue;
      }
      int64_t y = cols[x * width + classes[0]];
      for (size_t k = 1; k < classes.size(); ++k)
        if (int64_t(cols[x * width + classes[k]]) != y) return false;
      chain[d + 1] = y;
    }
    return true;
  };
  int64_t m = 0;
  auto found = [&](int32_t id, int64_t s) {  // each token's node is reached once
    out_ids[m++] = id;
    by_id[id] = int32_t(s);
  };
  for (int64_t i = 0; i < nodes;) {
    int64_t s = cols[at[depth[i] - 1] * width + cls[byte[i]]];
    if (s == dead) {
      i = skip[i];
      continue;
    }
    at[depth[i]] = s;
    if (token[i] >= 0) found(token[i], s);
    if (skip[i] > i + 1) {
      const uint64_t* u = below + 4 * i;
      auto [it, fresh] = loops.try_emplace(s);
      uint64_t* l = it->second.data();
      if (fresh) {
        const T* row = cols + s * width;
        for (int b = 0; b < 256; ++b)
          if (int64_t(row[cls[b]]) == s) l[b >> 6] |= uint64_t(1) << (b & 63);
      }
      if (!((u[0] & ~l[0]) | (u[1] & ~l[1]) | (u[2] & ~l[2]) | (u[3] & ~l[3]))) {  // all loop here
        for (int32_t r = rank[i + 1]; r < rank[skip[i]]; ++r) found(ranked[r], s);
        i = skip[i];
        continue;
      }
      if (deepest[i] > depth[i] + 1 && skip[i] - i > 16 && uniform_chain(i, s)) {
        for (int32_t r = rank[i + 1]; r < rank[skip[i]]; ++r)
          if (chain[ranked_len[r]] != dead) found(ranked[r], chain[ranked_len[r]]);
        i = skip[i];
        continue;
      }
    }
    ++i;
  }
  if (m * 16 < vocab_size) {  // few: sort them
    std::sort(out_ids, out_ids + m);
    for (int64_t k = 0; k < m; ++k) {
      out_states[k] = by_id[out_ids[k]];
      by_id[out_ids[k]] = -1;
    }
  } else {  // many (inside a string): read them off in id order
    for (int64_t id = 0, k = 0; id < vocab_size; ++id) {
      if (by_id[id] < 0) continue;
      out_ids[k] = id;
      out_states[k++] = by_id[id];
      by_id[id] = -1;
    }
  }
  return m;
}

}  // namespace

extern "C" {

// The tokens the DFA allows from ``state`` (the vocabulary's trie and ``by_id`` as walk_trie reads them;
// token ids below ``vocab_size``), written to ``out_ids`` / ``out_states`` (each room for every token) by
// ascending id; returns how many, or -1 out of memory. ``cols`` holds uint16 when ``elem_bytes`` is 2, else
// int32. Not reentrant on one ``by_id``.
int64_t agentrt_token_walk(const void* cols, int32_t elem_bytes, int64_t width, const uint8_t* cls, int64_t dead,
                           int64_t state, const uint8_t* byte, const int32_t* depth, const int32_t* skip,
                           const int32_t* token, const int32_t* rank, const int32_t* ranked,
                           const int32_t* ranked_len, const int32_t* deepest, const uint64_t* below, int64_t nodes,
                           int32_t max_depth, int64_t vocab_size, int32_t* by_id, int64_t* out_ids,
                           int64_t* out_states) {
  try {
    if (elem_bytes == 2)
      return walk_trie(static_cast<const uint16_t*>(cols), width, cls, dead, state, byte, depth, skip, token, rank,
                       ranked, ranked_len, deepest, below, nodes, max_depth, vocab_size, by_id, out_ids, out_states);
    return walk_trie(static_cast<const int32_t*>(cols), width, cls, dead, state, byte, depth, skip, token, rank,
                     ranked, ranked_len, deepest, below, nodes, max_depth, vocab_size, by_id, out_ids, out_states);
  } catch (const std::bad_alloc&) {
    return -1;
  }
}

// Compile ``regex`` (``len`` bytes of UTF-8). Never null; read the status first (0 ok, 1 unsupported
// syntax, 2 over a size or time limit (``max_seconds`` > 0), 3 out of memory) and free it with
// agentrt_regex_dfa_free.
void* agentrt_regex_dfa(const char* regex, int64_t len, int64_t max_states, int64_t max_nfa_states,
                        double max_seconds) {
  return build_result([&](Dfa& d) {
    Parser parser(regex, size_t(len));
    int root = parser.parse();
    Deadline deadline(max_seconds);
    NfaBuilder nfa(parser.nodes, size_t(max_nfa_states), deadline);
    int32_t match = nfa.make();
    nfa.st[match].match = true;
    int32_t start = nfa.compile(root, match);
    Determinizer(nfa.st, size_t(max_states), deadline).run(start, d);
    if (size_t(d.n + 1) * d.nclasses <= kMaxMinimizeEdges) minimize(d);
  });
}

int agentrt_regex_dfa_status(void* h) { return static_cast<Result*>(h)->status; }

const char* agentrt_regex_dfa_message(void* h) { return static_cast<Result*>(h)->message.c_str(); }

int64_t agentrt_regex_dfa_states(void* h) { return static_cast<Result*>(h)->dfa.n; }

int64_t agentrt_regex_dfa_nclasses(void* h) { return static_cast<Result*>(h)->dfa.nclasses; }

// Writes the table's columns, one per byte class, [n + 1, nclasses] (row n: the dead state), and final [n + 1].
void agentrt_regex_dfa_columns(void* h, int32_t* columns, uint8_t* final) {
  const Dfa& d = static_cast<Result*>(h)->dfa;
  const int64_t k = d.nclasses;
  for (int64_t i = 0; i < int64_t(d.n) * k; ++i) columns[i] = d.trans[i] < 0 ? d.n : d.trans[i];
  std::fill(columns + int64_t(d.n) * k, columns + int64_t(d.n + 1) * k, d.n);
  std::copy(d.final.begin(), d.final.end(), final);
  final[d.n] = 0;
}

// Writes each byte's class [256]: bytes of one class have equal columns in the table.
void agentrt_regex_dfa_classes(void* h, uint8_t* cls) {
  std::copy(std::begin(static_cast<Result*>(h)->dfa.cls), std::end(static_cast<Result*>(h)->dfa.cls), cls);
}

// Merges the equivalent states of a dense table [rows, 256] (row rows - 1: the dead state) whose bytes of
// one class in ``cls`` have equal columns: fills ``block_of`` [rows] and returns the number of states
// after (the dead state's last), or -1 when it is too large to minimize or memory runs out.
int32_t agentrt_dfa_minimize(const int32_t* table, const uint8_t* final, int64_t rows, const uint8_t* cls,
                             int32_t* block_of) {
  int k = 0, rep[256];
  std::fill(rep, rep + 256, -1);
  for (int b = 0; b < 256; ++b) {
    if (rep[cls[b]] < 0) rep[cls[b]] = b;  // a byte of each class stands for it
    k = std::max(k, cls[b] + 1);
  }
  if (size_t(rows) * k > kMaxMinimizeEdges) return -1;
  try {
    std::vector<int32_t> out;
    int32_t m = minimize(int32_t(rows), k, final,
                         [&](int32_t s, int c) { return table[int64_t(s) * 256 + rep[c]]; }, out);
    std::copy(out.begin(), out.end(), block_of);
    return m;
  } catch (const std::bad_alloc&) {
    return -1;
  }
}

// The DFA of the texts two DFAs both match: the pairs of their states reachable from (ia, ib), numbered
// in breadth-first order (0: the initial pair), in the byte classes ``cls`` (within both DFAs' own). ca
// [rows_a, width_a] and cb are the DFAs' columns, their last rows the dead states; the product's class c
// is column ``map_a[c]`` of ca (``map_b[c]`` of cb). Read like agentrt_regex_dfa's result (status 2: past
// ``max_states`` or ``max_seconds`` when > 0); not minimized.
void* agentrt_dfa_intersect(const int32_t* ca, const uint8_t* fa, int64_t rows_a, int64_t width_a, int64_t ia,
                            const int32_t* cb, const uint8_t* fb, int64_t rows_b, int64_t width_b, int64_t ib,
                            const uint8_t* cls, const int32_t* map_a, const int32_t* map_b, int64_t max_states,
                            double max_seconds) {
  return build_result([&](Dfa& d) {
    for (int b = 0; b < 256; ++b) {
      d.nclasses = std::max(d.nclasses, cls[b] + 1);
      d.cls[b] = cls[b];
    }
    const int64_t dead_a = rows_a - 1, dead_b = rows_b - 1;
    const Deadline deadline(max_seconds);
    std::unordered_map<int64_t, int32_t> ids;
    std::vector<std::pair<int32_t, int32_t>> pairs;
    auto id_of = [&](int64_t a, int64_t b) {
      auto [it, fresh] = ids.try_emplace(a * rows_b + b, int32_t(pairs.size()));
      if (fresh) {
        if (int64_t(pairs.size()) >= max_states)
          throw Failure{kTooLarge, "intersecting two automata passed " + std::to_string(max_states) + " states"};
        if ((pairs.size() & 4095) == 4095) deadline.check("intersection", pairs.size());
        pairs.emplace_back(int32_t(a), int32_t(b));
      }
      return it->second;
    };
    id_of(ia, ib);
    for (size_t i = 0; i < pairs.size(); ++i) {
      const auto [a, b] = pairs[i];
      for (int c = 0; c < d.nclasses; ++c) {
        const int64_t na = ca[int64_t(a) * width_a + map_a[c]], nb = cb[int64_t(b) * width_b + map_b[c]];
        d.trans.push_back(na == dead_a || nb == dead_b ? -1 : id_of(na, nb));
      }
      d.final.push_back(fa[a] && fb[b]);
    }
    d.n = int32_t(pairs.size());
  });
}

void agentrt_regex_dfa_free(void* h) { delete static_cast<Result*>(h); }

}  // extern "C"
