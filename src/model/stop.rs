//! Stopping inside a step: a scoped stop check.
//!
//! Whoever drives the model (the pipeline, for a worker) installs a check for the duration of a
//! piece of work with [`scoped`]; the model consults it with [`check`] between UNet blocks,
//! between VAE decoder blocks and between attention query tiles ([`super::nn::attention`]). When
//! it fires, the running forward pass gives up with [`ModelError::Stopped`]. The model knows
//! nothing of why (deadline, client gone, shutdown): that stays with the caller.
//!
//! The check must be monotonic (once true, true until the scope ends): code that skips work
//! because the check fired relies on the next [`check`] failing too. Checks are per thread (each
//! worker is one thread running its batch); scopes nest, and any installed check firing counts.

use std::cell::RefCell;
use std::rc::Rc;

use super::ModelError;

thread_local! {
    static CHECKS: RefCell<Vec<Rc<dyn Fn() -> bool>>> = const { RefCell::new(Vec::new()) };
}

/// Removes its check when dropped (also on unwinding).
struct Guard;

impl Drop for Guard {
    fn drop(&mut self) {
        CHECKS.with(|c| {
            c.borrow_mut().pop();
        });
    }
}

/// Runs `f` with `check` installed on this thread.
pub fn scoped<R>(check: Rc<dyn Fn() -> bool>, f: impl FnOnce() -> R) -> R {
    CHECKS.with(|c| c.borrow_mut().push(check));
    let _guard = Guard;
    f()
}

/// Whether an installed check says to stop.
pub fn should_stop() -> bool {
    // Cloned out first: a check may itself run model code that asks.
    let checks: Vec<Rc<dyn Fn() -> bool>> = CHECKS.with(|c| c.borrow().clone());
    checks.iter().any(|f| f())
}

/// `Err(ModelError::Stopped)` when an installed check says to stop.
pub fn check() -> Result<(), ModelError> {
    if should_stop() { Err(ModelError::Stopped) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn scopes_nest_and_end() {
        assert!(check().is_ok());
        let flag = Rc::new(Cell::new(false));
        let f = flag.clone();
        scoped(Rc::new(move || f.get()), || {
            assert!(check().is_ok());
            scoped(Rc::new(|| false), || {
                flag.set(true);
                assert!(matches!(check(), Err(ModelError::Stopped)));
            });
            assert!(should_stop());
        });
        assert!(!should_stop(), "the check is gone with its scope");
    }
}
