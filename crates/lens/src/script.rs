//! `custom` steps: JavaScript `up` and `down` functions run in an embedded,
//! sandboxed QuickJS engine (no I/O, bounded memory, a time limit per call).
//!
//! Each thread keeps one engine and caches compiled functions by source, so a
//! migration set can be shared between threads while QuickJS stays on one.

use crate::ops::{Direction, Kept};
use crate::LensError;
use rquickjs::{Context, Ctx, Function, Persistent, Runtime, Value as JsValue};
use serde_json::Value;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The default time limit for one call of a `custom` function.
pub const DEFAULT_TIME_LIMIT: Duration = Duration::from_millis(200);
const MEMORY_LIMIT: usize = 64 << 20;

/// A `custom` step: the JavaScript source of its two functions.
///
/// Each source is an expression that evaluates to a function of
/// `(doc, kept, keep)`: it returns the new document (or changes `doc` in
/// place and returns nothing). `kept` is what the opposite direction kept for
/// this document (`{}` if nothing); into the empty object `keep` it puts
/// whatever the opposite direction will need to restore exactly.
#[derive(Debug, Clone)]
pub struct Script {
    /// Source of `up`.
    pub up: String,
    /// Source of `down`.
    pub down: String,
    /// Limit for one call.
    pub time_limit: Duration,
}

/// Fields drop in order: saved functions before their context, the context
/// before its runtime (QuickJS asserts that nothing outlives the runtime).
struct Engine {
    functions: HashMap<String, Persistent<Function<'static>>>,
    context: Context,
    deadline: Rc<Cell<Option<Instant>>>,
    _runtime: Runtime,
}

thread_local! {
    static ENGINE: RefCell<Option<Engine>> = const { RefCell::new(None) };
}

fn with_engine<R>(f: impl FnOnce(&mut Engine) -> Result<R, String>) -> Result<R, String> {
    ENGINE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let runtime = Runtime::new().map_err(|e| e.to_string())?;
            runtime.set_memory_limit(MEMORY_LIMIT);
            runtime.set_max_stack_size(1 << 20);
            let deadline: Rc<Cell<Option<Instant>>> = Rc::new(Cell::new(None));
            let watched = deadline.clone();
            runtime.set_interrupt_handler(Some(Box::new(move || {
                watched.get().is_some_and(|d| Instant::now() > d)
            })));
            let context = Context::full(&runtime).map_err(|e| e.to_string())?;
            *slot = Some(Engine {
                functions: HashMap::new(),
                context,
                deadline,
                _runtime: runtime,
            });
        }
        f(slot.as_mut().expect("engine was just created"))
    })
}

fn exception_text(ctx: &Ctx<'_>, error: rquickjs::Error) -> String {
    if error.is_exception() {
        let caught = ctx.catch();
        if let Some(exception) = caught.as_exception() {
            return exception.to_string();
        }
        if let Ok(Some(text)) = ctx.json_stringify(caught) {
            if let Ok(text) = text.to_string() {
                return text;
            }
        }
        return "a JavaScript exception".to_owned();
    }
    error.to_string()
}

fn function<'js>(
    ctx: &Ctx<'js>,
    functions: &mut HashMap<String, Persistent<Function<'static>>>,
    source: &str,
) -> Result<Function<'js>, String> {
    if let Some(saved) = functions.get(source) {
        return saved.clone().restore(ctx).map_err(|e| e.to_string());
    }
    let value: JsValue = ctx
        .eval(format!("({source}\n)"))
        .map_err(|e| exception_text(ctx, e))?;
    let Some(f) = value.as_function().cloned() else {
        return Err("the source does not evaluate to a function".to_owned());
    };
    functions.insert(source.to_owned(), Persistent::save(ctx, f.clone()));
    Ok(f)
}

fn stringify<'js>(ctx: &Ctx<'js>, value: JsValue<'js>) -> Result<String, String> {
    match ctx
        .json_stringify(value)
        .map_err(|e| exception_text(ctx, e))?
    {
        Some(s) => s.to_string().map_err(|e| e.to_string()),
        None => Err("the function returned something that is not JSON".into()),
    }
}

impl Script {
    /// Compiles both functions; the error says which one and why.
    pub fn compile(&self) -> Result<(), String> {
        for (name, source) in [("up", &self.up), ("down", &self.down)] {
            with_engine(|engine| {
                engine
                    .context
                    .with(|ctx| function(&ctx, &mut engine.functions, source).map(|_| ()))
            })
            .map_err(|e| {
                let e = e.lines().map(str::trim).collect::<Vec<_>>().join(" ");
                format!("`{name}` does not compile: {e}")
            })?;
        }
        Ok(())
    }

    /// Runs the function for `direction` on `doc`, given what the opposite direction kept.
    pub fn run(
        &self,
        direction: Direction,
        doc: &mut Value,
        kept_in: &Kept,
    ) -> Result<Kept, LensError> {
        let (name, source) = match direction {
            Direction::Up => ("up", &self.up),
            Direction::Down => ("down", &self.down),
        };
        // Most documents hold only integers JavaScript writes back as they
        // are written: no number to shield going in or to restore coming out.
        let plain =
            numbers_survive_javascript(doc) && kept_in.values().all(numbers_survive_javascript);
        let doc_text = if plain {
            serde_json::to_string(doc)
        } else {
            let mut shielded = doc.clone();
            shield_numbers(&mut shielded);
            serde_json::to_string(&shielded)
        }
        .map_err(|e| LensError::Script(e.to_string()))?;
        let kept_text =
            serde_json::to_string(kept_in).map_err(|e| LensError::Script(e.to_string()))?;
        let (new_doc, kept_out) = with_engine(|engine| {
            engine.deadline.set(Some(Instant::now() + self.time_limit));
            let result = engine.context.with(|ctx| {
                let f = function(&ctx, &mut engine.functions, source)?;
                let doc_js = ctx
                    .json_parse(doc_text)
                    .map_err(|e| exception_text(&ctx, e))?;
                let kept_js = ctx
                    .json_parse(kept_text)
                    .map_err(|e| exception_text(&ctx, e))?;
                let keep_js = rquickjs::Object::new(ctx.clone()).map_err(|e| e.to_string())?;
                let returned: JsValue = f
                    .call((doc_js.clone(), kept_js, keep_js.clone()))
                    .map_err(|e| exception_text(&ctx, e))?;
                let result = if returned.is_undefined() {
                    doc_js
                } else {
                    returned
                };
                Ok((
                    stringify(&ctx, result)?,
                    stringify(&ctx, keep_js.into_value())?,
                ))
            });
            engine.deadline.set(None);
            result
        })
        .map_err(|e| LensError::Script(format!("`{name}`: {e}")))?;
        let mut new_doc: Value = serde_json::from_str(&new_doc)
            .map_err(|e| LensError::Script(format!("`{name}` returned bad JSON: {e}")))?;
        if !new_doc.is_object() {
            return Err(LensError::Script(format!(
                "`{name}` must return an object, returned {new_doc}"
            )));
        }
        let mut numbers = HashMap::new();
        if !plain {
            collect_numbers(doc, &mut numbers);
            kept_in
                .values()
                .for_each(|v| collect_numbers(v, &mut numbers));
            restore_number_text(&mut new_doc, &numbers);
        }
        *doc = new_doc;
        match serde_json::from_str(&kept_out) {
            Ok(Value::Object(mut kept)) => {
                if !plain {
                    for value in kept.values_mut() {
                        restore_number_text(value, &numbers);
                    }
                }
                Ok(kept)
            }
            _ => Err(LensError::Script(format!(
                "`{name}` put something in `keep` that is not JSON"
            ))),
        }
    }
}

/// Marks a number a double cannot hold (`1e400`) while JavaScript has the document.
const SHIELD: &str = "\u{0}rewind-number:";

/// True when every number in `value` is an integer of at most 15 digits
/// (not `-0`): a double holds it exactly and JavaScript writes it back as
/// it is written, so it needs no shield and no restoring.
fn numbers_survive_javascript(value: &Value) -> bool {
    match value {
        Value::Number(n) => crate::json_text::is_plain_integer(n.as_str()),
        Value::Object(o) => o.values().all(numbers_survive_javascript),
        Value::Array(a) => a.iter().all(numbers_survive_javascript),
        _ => true,
    }
}

/// Replaces numbers a double cannot hold, and negative zeros (JavaScript
/// writes `-0` as `0`, which would then take the text of an input `0`), by
/// marked strings.
fn shield_numbers(value: &mut Value) {
    match value {
        Value::Number(n)
            if !n
                .as_f64()
                .is_some_and(|f| f.is_finite() && !(f == 0.0 && f.is_sign_negative())) =>
        {
            *value = Value::String(format!("{SHIELD}{n}"));
        }
        Value::Object(o) => o.values_mut().for_each(shield_numbers),
        Value::Array(a) => a.iter_mut().for_each(shield_numbers),
        _ => {}
    }
}

/// The numbers of the input by their double value, with their original text.
fn collect_numbers(value: &Value, out: &mut HashMap<u64, serde_json::Number>) {
    match value {
        Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                out.entry(f.to_bits()).or_insert_with(|| n.clone());
            }
        }
        Value::Object(o) => o.values().for_each(|v| collect_numbers(v, out)),
        Value::Array(a) => a.iter().for_each(|v| collect_numbers(v, out)),
        _ => {}
    }
}

/// JavaScript numbers are doubles: a number that came back with the value of
/// an input number gets that number's text back (`1.10`, big integers).
fn restore_number_text(value: &mut Value, numbers: &HashMap<u64, serde_json::Number>) {
    match value {
        Value::Number(n) => {
            if let Some(original) = n.as_f64().and_then(|f| numbers.get(&f.to_bits())) {
                *n = original.clone();
            }
        }
        Value::String(s) if s.starts_with(SHIELD) => {
            if let Ok(n) = s[SHIELD.len()..].parse::<serde_json::Number>() {
                *value = Value::Number(n);
            }
        }
        Value::Object(o) => o.values_mut().for_each(|v| restore_number_text(v, numbers)),
        Value::Array(a) => a.iter_mut().for_each(|v| restore_number_text(v, numbers)),
        _ => {}
    }
}
