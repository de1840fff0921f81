<?php

declare(strict_types=1);

namespace Wsboard\Exception;

/** With --redis: Redis cannot be reached, so the answer cannot be known. */
final class BackplaneUnavailableException extends WsboardException
{
}
