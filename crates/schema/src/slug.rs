//! The file-name form of a track event name, shared by the registry loader and its callers.

/// Lowercases `name`, replaces each run of non-alphanumeric characters with one `_` and trims
/// leading and trailing `_`: `"Order Completed"` becomes `"order_completed"`.
pub fn event_slug(name: &str) -> String {
    let mut slug = String::with_capacity(name.len());
    let mut pending_separator = false;
    for c in name.chars() {
        if c.is_alphanumeric() {
            if pending_separator && !slug.is_empty() {
                slug.push('_');
            }
            pending_separator = false;
            slug.extend(c.to_lowercase());
        } else {
            pending_separator = true;
        }
    }
    slug
}

#[cfg(test)]
mod tests {
    use super::event_slug;

    #[test]
    fn spaces_become_underscores_and_case_is_folded() {
        assert_eq!(event_slug("Order Completed"), "order_completed");
        assert_eq!(event_slug("Application Opened"), "application_opened");
    }

    #[test]
    fn runs_of_punctuation_collapse_to_one_underscore() {
        assert_eq!(
            event_slug("Product -- Added!  (cart)"),
            "product_added_cart"
        );
        assert_eq!(event_slug("checkout.started"), "checkout_started");
    }

    #[test]
    fn leading_and_trailing_separators_are_trimmed() {
        assert_eq!(event_slug("  __Signed Up__ "), "signed_up");
        assert_eq!(event_slug("!!!"), "");
    }

    #[test]
    fn digits_and_existing_slugs_are_kept() {
        assert_eq!(event_slug("Step 2 Viewed"), "step_2_viewed");
        assert_eq!(event_slug("order_completed"), "order_completed");
    }
}
