-- 006_shape_ids.sql: a table shape is recorded by its content, never trusted by its id.
--
-- walpipe proposes a shape id, a 63-bit FNV-1a hash of (schema, table,
-- columns).  FNV is no cryptographic hash: whoever may create tables on a
-- source can craft a table whose shape hashes to the id of another, and the
-- mirror, which reads a shape by (source, shape_id), would then follow the
-- wrong columns (up to DROP COLUMN).  So the stager records every new shape
-- through this function, which returns the id the shape really has in
-- staging: the proposed one when it is free or holds this very shape;
-- otherwise the first of a chain of alternatives (SHA-256 of the content and
-- the step, 63 bits; nobody can aim a table at those) that is free or holds
-- this shape.  The chain depends on the content only, so a restart finds the
-- same id again, and rows of one shape always name one id.
--
-- VOLATILE (the default), so each statement sees what other transactions
-- committed (the stager runs it under READ COMMITTED): a conflicting row
-- that ON CONFLICT waited for is visible to the SELECT that follows.
CREATE FUNCTION walpipe.record_shape(p_source TEXT, p_shape_id BIGINT, p_schema TEXT, p_table TEXT,
                                     p_columns JSONB, p_first_lsn PG_LSN) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    id    BIGINT := p_shape_id;
    step  INT := 0;
    held  RECORD;
BEGIN
    FOR attempt IN 1..100 LOOP
        INSERT INTO walpipe.table_schemas (source, shape_id, schema_name, table_name, columns, first_lsn)
        VALUES (p_source, id, p_schema, p_table, p_columns, p_first_lsn)
        ON CONFLICT (source, shape_id) DO NOTHING;
        IF FOUND THEN
            RETURN id;
        END IF;
        SELECT schema_name, table_name, columns INTO held
          FROM walpipe.table_schemas WHERE source = p_source AND shape_id = id;
        IF FOUND THEN
            IF held.schema_name = p_schema AND held.table_name = p_table AND held.columns = p_columns THEN
                RETURN id;
            END IF;
            -- another shape holds this id: the next alternative
            step := step + 1;
            id := ('x' || left(encode(sha256(convert_to(format('%s|%s|%s|%s|%s|%s', step, length(p_schema), p_schema,
                                                               length(p_table), p_table, p_columns::text),
                                                        'UTF8')), 'hex'), 16))::bit(64)::bigint
                  & 9223372036854775807;
            IF id = 0 THEN
                id := 1;
            END IF;
        END IF;
        -- not found: its holder was deleted in between; the same id again
    END LOOP;
    RAISE EXCEPTION 'no free shape id for table "%"."%" of source "%" after 100 attempts', p_schema, p_table, p_source;
END
$$;
